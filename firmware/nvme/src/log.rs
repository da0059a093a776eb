//! Log pages (NVMe base 2.0 §5.16) and the Discovery log page (NVMe-oF 1.1 §5.3).

use crate::le;
use crate::sqe::Sqe;

/// Get Log Page command fields (Figures 199-201).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetLogPageCommand {
    /// Log Page Identifier.
    pub lid: u8,
    /// Log Specific Field (CDW10 bits 14:8).
    pub lsp: u8,
    /// Retain Asynchronous Event (CDW10 bit 15).
    pub rae: bool,
    /// Number of dwords, 0's based (NUMDU:NUMDL).
    pub numd: u32,
    /// Log Specific Identifier (CDW11 bits 31:16).
    pub lsi: u16,
    /// Log Page Offset in bytes (LPOU:LPOL).
    pub offset: u64,
}

impl GetLogPageCommand {
    /// Reads the fields of a Get Log Page SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            lid: s.cdw[0] as u8,
            lsp: ((s.cdw[0] >> 8) & 0x7F) as u8,
            rae: s.cdw[0] & (1 << 15) != 0,
            numd: (s.cdw[0] >> 16) | ((s.cdw[1] & 0xFFFF) << 16),
            lsi: (s.cdw[1] >> 16) as u16,
            offset: s.cdw[2] as u64 | ((s.cdw[3] as u64) << 32),
        }
    }

    /// Number of bytes requested ((NUMD + 1) × 4).
    pub const fn len_bytes(&self) -> u64 {
        (self.numd as u64 + 1) * 4
    }

    /// Builds a Get Log Page SQE for `len` bytes (rounded down to dwords, at least one) at
    /// `offset`.
    pub fn to_sqe(cid: u16, nsid: u32, lid: u8, rae: bool, offset: u64, len: u32) -> Sqe {
        let numd = (len / 4).saturating_sub(1);
        let mut s = Sqe::new(crate::AdminOpcode::GetLogPage as u8, cid).with_nsid(nsid);
        s.cdw[0] = lid as u32 | ((rae as u32) << 15) | ((numd & 0xFFFF) << 16);
        s.cdw[1] = numd >> 16;
        s.cdw[2] = offset as u32;
        s.cdw[3] = (offset >> 32) as u32;
        s
    }
}

/// Error Information log entry (Figure 205), 64 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorLogEntry {
    /// Error Count (0 = invalid entry).
    pub error_count: u64,
    /// Submission Queue ID.
    pub sqid: u16,
    /// Command ID.
    pub cid: u16,
    /// Status Field (phase bit included).
    pub status: u16,
    /// Parameter Error Location.
    pub param_error_location: u16,
    /// LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// Transport Type.
    pub trtype: u8,
}

impl ErrorLogEntry {
    /// Entry size.
    pub const SIZE: usize = 64;
    /// Parameter Error Location / SQID / CID when the error is not specific to one.
    pub const NOT_SPECIFIC: u16 = 0xFFFF;

    /// A Parameter Error Location: byte `byte` (0..=63) of the command, bit `bit` (0..=7)
    /// of that byte (bits 7:0 and 10:8 of the field).
    pub const fn location(byte: u8, bit: u8) -> u16 {
        (byte & 0x3F) as u16 | (((bit & 7) as u16) << 8)
    }

    /// Encodes into 64 bytes.
    pub fn encode(&self, b: &mut [u8; 64]) {
        b.fill(0);
        le::put_u64(b, 0, self.error_count);
        le::put_u16(b, 8, self.sqid);
        le::put_u16(b, 10, self.cid);
        le::put_u16(b, 12, self.status);
        le::put_u16(b, 14, self.param_error_location);
        le::put_u64(b, 16, self.lba);
        le::put_u32(b, 24, self.nsid);
        le::put_u8(b, 29, self.trtype);
    }

    /// Decodes 64 bytes.
    pub fn decode(b: &[u8; 64]) -> Self {
        Self {
            error_count: le::u64_at(b, 0),
            sqid: le::u16_at(b, 8),
            cid: le::u16_at(b, 10),
            status: le::u16_at(b, 12),
            param_error_location: le::u16_at(b, 14),
            lba: le::u64_at(b, 16),
            nsid: le::u32_at(b, 24),
            trtype: le::u8_at(b, 29),
        }
    }
}

/// SMART / Health Information log (Figure 207), 512 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmartLog {
    /// Critical Warning.
    pub critical_warning: u8,
    /// Composite Temperature in kelvins.
    pub composite_temperature: u16,
    /// Available Spare (percent).
    pub available_spare: u8,
    /// Available Spare Threshold (percent).
    pub available_spare_threshold: u8,
    /// Percentage Used.
    pub percentage_used: u8,
    /// Data Units Read (thousands of 512-byte units, rounded up).
    pub data_units_read: u128,
    /// Data Units Written.
    pub data_units_written: u128,
    /// Host Read Commands.
    pub host_read_commands: u128,
    /// Host Write Commands.
    pub host_write_commands: u128,
    /// Controller Busy Time (minutes).
    pub controller_busy_time: u128,
    /// Power Cycles.
    pub power_cycles: u128,
    /// Power On Hours.
    pub power_on_hours: u128,
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: u128,
    /// Media and Data Integrity Errors.
    pub media_errors: u128,
    /// Number of Error Information Log Entries.
    pub num_error_log_entries: u128,
}

impl SmartLog {
    /// Log size.
    pub const SIZE: usize = 512;

    /// Converts a byte count to Data Units (1000 × 512 bytes, rounded up).
    pub const fn data_units(bytes: u64) -> u128 {
        (bytes as u128).div_ceil(512).div_ceil(1000)
    }

    /// Encodes into 512 bytes.
    pub fn encode(&self, b: &mut [u8; 512]) {
        b.fill(0);
        le::put_u8(b, 0, self.critical_warning);
        le::put_u16(b, 1, self.composite_temperature);
        le::put_u8(b, 3, self.available_spare);
        le::put_u8(b, 4, self.available_spare_threshold);
        le::put_u8(b, 5, self.percentage_used);
        le::put_u128(b, 32, self.data_units_read);
        le::put_u128(b, 48, self.data_units_written);
        le::put_u128(b, 64, self.host_read_commands);
        le::put_u128(b, 80, self.host_write_commands);
        le::put_u128(b, 96, self.controller_busy_time);
        le::put_u128(b, 112, self.power_cycles);
        le::put_u128(b, 128, self.power_on_hours);
        le::put_u128(b, 144, self.unsafe_shutdowns);
        le::put_u128(b, 160, self.media_errors);
        le::put_u128(b, 176, self.num_error_log_entries);
    }

    /// Decodes 512 bytes.
    pub fn decode(b: &[u8; 512]) -> Self {
        Self {
            critical_warning: le::u8_at(b, 0),
            composite_temperature: le::u16_at(b, 1),
            available_spare: le::u8_at(b, 3),
            available_spare_threshold: le::u8_at(b, 4),
            percentage_used: le::u8_at(b, 5),
            data_units_read: le::u128_at(b, 32),
            data_units_written: le::u128_at(b, 48),
            host_read_commands: le::u128_at(b, 64),
            host_write_commands: le::u128_at(b, 80),
            controller_busy_time: le::u128_at(b, 96),
            power_cycles: le::u128_at(b, 112),
            power_on_hours: le::u128_at(b, 128),
            unsafe_shutdowns: le::u128_at(b, 144),
            media_errors: le::u128_at(b, 160),
            num_error_log_entries: le::u128_at(b, 176),
        }
    }
}

/// Firmware Slot Information log (Figure 208), 512 bytes: AFI and FRS1..FRS7.
pub fn encode_firmware_slot(active_slot: u8, slots: &[[u8; 8]], b: &mut [u8; 512]) {
    b.fill(0);
    le::put_u8(b, 0, active_slot & 0x7);
    for (i, s) in slots.iter().take(7).enumerate() {
        le::put_bytes(b, 8 + 8 * i, s);
    }
}

/// Changed Namespace List log (Figure 209), 4096 bytes: up to 1024 NSIDs; when more changed
/// (`overflow`), the first entry is FFFFFFFFh and the rest zero.
pub fn encode_changed_ns_list(nsids: &[u32], overflow: bool, b: &mut [u8; 4096]) {
    b.fill(0);
    if overflow || nsids.len() > 1024 {
        le::put_u32(b, 0, 0xFFFF_FFFF);
        return;
    }
    for (i, n) in nsids.iter().enumerate() {
        le::put_u32(b, 4 * i, *n);
    }
}

bitflags::bitflags! {
    /// A Commands Supported and Effects entry (Figure 211; Linux `NVME_CMD_EFFECTS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Effects: u32 {
        /// Bit 0: Command Supported.
        const CSUPP = 1 << 0;
        /// Bit 1: Logical Block Content Change.
        const LBCC = 1 << 1;
        /// Bit 2: Namespace Capability Change.
        const NCC = 1 << 2;
        /// Bit 3: Namespace Inventory Change.
        const NIC = 1 << 3;
        /// Bit 4: Controller Capability Change.
        const CCC = 1 << 4;
        const _ = !0;
    }
}

/// Commands Supported and Effects log (Figure 210), 4096 bytes: admin entries at byte
/// 4 × opcode, I/O entries at 1024 + 4 × opcode.
pub fn encode_effects(admin: &[(u8, Effects)], io: &[(u8, Effects)], b: &mut [u8; 4096]) {
    b.fill(0);
    for (op, e) in admin {
        le::put_u32(b, 4 * *op as usize, e.bits());
    }
    for (op, e) in io {
        le::put_u32(b, 1024 + 4 * *op as usize, e.bits());
    }
}

/// Discovery log page constants and encoding (NVMe-oF 1.1 Figures 37-38).
pub mod discovery {
    use crate::le;

    /// Size of the header and of each entry.
    pub const RECORD_LEN: usize = 1024;

    /// Transport type: RDMA.
    pub const TRTYPE_RDMA: u8 = 1;
    /// Transport type: Fibre Channel.
    pub const TRTYPE_FC: u8 = 2;
    /// Transport type: TCP.
    pub const TRTYPE_TCP: u8 = 3;
    /// Transport type: intra-host (loop).
    pub const TRTYPE_LOOP: u8 = 254;

    /// Address family: IPv4.
    pub const ADRFAM_IPV4: u8 = 1;
    /// Address family: IPv6.
    pub const ADRFAM_IPV6: u8 = 2;

    /// Subsystem type: referral to another discovery service.
    pub const SUBTYPE_DISCOVERY_REFERRAL: u8 = 1;
    /// Subsystem type: NVM subsystem.
    pub const SUBTYPE_NVM: u8 = 2;
    /// Subsystem type: the current discovery subsystem.
    pub const SUBTYPE_CURRENT_DISCOVERY: u8 = 3;

    /// TREQ: secure channel not specified.
    pub const TREQ_NOT_SPECIFIED: u8 = 0;
    /// TREQ: secure channel required.
    pub const TREQ_REQUIRED: u8 = 1;
    /// TREQ: secure channel not required.
    pub const TREQ_NOT_REQUIRED: u8 = 2;
    /// TREQ: SQ flow control disable supported (bit 2).
    pub const TREQ_DISABLE_SQFLOW: u8 = 1 << 2;

    /// Header (bytes 0..1024 of the log).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Header {
        /// Generation Counter.
        pub genctr: u64,
        /// Number of Records.
        pub numrec: u64,
        /// Record Format.
        pub recfmt: u16,
    }

    impl Header {
        /// Encodes the 1024-byte header.
        pub fn encode(&self, b: &mut [u8; RECORD_LEN]) {
            b.fill(0);
            le::put_u64(b, 0, self.genctr);
            le::put_u64(b, 8, self.numrec);
            le::put_u16(b, 16, self.recfmt);
        }
        /// Decodes the header.
        pub fn decode(b: &[u8; RECORD_LEN]) -> Self {
            Self {
                genctr: le::u64_at(b, 0),
                numrec: le::u64_at(b, 8),
                recfmt: le::u16_at(b, 16),
            }
        }
    }

    /// Byte offsets of the string fields of a Discovery Log Page Entry (NVMe-oF 1.1 §5.3,
    /// Discovery Log Page Entry figure; Linux `struct nvmf_disc_rsp_page_entry`): TRSVCID
    /// bytes 63:32, SUBNQN 511:256, TRADDR 767:512, TSAS 1023:768.
    pub mod entry_field {
        /// Transport Service Identifier (32 bytes).
        pub const TRSVCID: usize = 32;
        /// NVM Subsystem Qualified Name (256 bytes).
        pub const SUBNQN: usize = 256;
        /// Transport Address (256 bytes).
        pub const TRADDR: usize = 512;
        /// Transport Specific Address Subtype (256 bytes).
        pub const TSAS: usize = 768;
    }

    /// A 1024-byte Discovery Log Page Entry.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Entry {
        /// Transport Type.
        pub trtype: u8,
        /// Address Family.
        pub adrfam: u8,
        /// Subsystem Type.
        pub subtype: u8,
        /// Transport Requirements.
        pub treq: u8,
        /// Port ID.
        pub portid: u16,
        /// Controller ID (FFFFh: dynamic controller model).
        pub cntlid: u16,
        /// Admin Max SQ Size.
        pub asqsz: u16,
        /// Transport Service Identifier (ASCII, NUL padded).
        pub trsvcid: [u8; 32],
        /// Transport Address (ASCII, NUL padded).
        pub traddr: [u8; 256],
        /// NVM Subsystem NQN (NUL padded).
        pub subnqn: [u8; 256],
        /// Transport Specific Address Subtype (TCP: byte 0 SECTYPE).
        pub tsas: [u8; 256],
    }

    impl Entry {
        /// Encodes the entry.
        pub fn encode(&self, b: &mut [u8; RECORD_LEN]) {
            b.fill(0);
            le::put_u8(b, 0, self.trtype);
            le::put_u8(b, 1, self.adrfam);
            le::put_u8(b, 2, self.subtype);
            le::put_u8(b, 3, self.treq);
            le::put_u16(b, 4, self.portid);
            le::put_u16(b, 6, self.cntlid);
            le::put_u16(b, 8, self.asqsz);
            le::put_bytes(b, entry_field::TRSVCID, &self.trsvcid);
            le::put_bytes(b, entry_field::SUBNQN, &self.subnqn);
            le::put_bytes(b, entry_field::TRADDR, &self.traddr);
            le::put_bytes(b, entry_field::TSAS, &self.tsas);
        }
        /// Decodes an entry.
        pub fn decode(b: &[u8; RECORD_LEN]) -> Self {
            Self {
                trtype: le::u8_at(b, 0),
                adrfam: le::u8_at(b, 1),
                subtype: le::u8_at(b, 2),
                treq: le::u8_at(b, 3),
                portid: le::u16_at(b, 4),
                cntlid: le::u16_at(b, 6),
                asqsz: le::u16_at(b, 8),
                trsvcid: le::array_at(b, entry_field::TRSVCID),
                traddr: le::array_at(b, entry_field::TRADDR),
                subnqn: le::array_at(b, entry_field::SUBNQN),
                tsas: le::array_at(b, entry_field::TSAS),
            }
        }
        /// TRADDR as a string.
        pub fn traddr_str(&self) -> Option<&str> {
            le::str_at(&self.traddr, 0, 256)
        }
        /// TRSVCID as a string.
        pub fn trsvcid_str(&self) -> Option<&str> {
            le::str_at(&self.trsvcid, 0, 32)
        }
        /// SUBNQN as a string.
        pub fn subnqn_str(&self) -> Option<&str> {
            le::str_at(&self.subnqn, 0, 256)
        }
    }
}

/// Asymmetric Namespace Access log page (LID 0Ch, NVMe base 2.0 §5.16.1.12, Figures 227-228;
/// Linux `struct nvme_ana_rsp_hdr` / `struct nvme_ana_group_desc`): a 16-byte header, then one
/// 32-byte descriptor per ANA group, each followed by its NSIDs (none when the host set RGO).
pub mod ana {
    use crate::le;
    use crate::sqe::Sqe;

    /// Bytes of the log header (Figure 227: CHGCNT, NGRPS, reserved).
    pub const HEADER_LEN: usize = 16;
    /// Bytes of a group descriptor before its NSID list (Figure 228).
    pub const DESC_LEN: usize = 32;
    /// Log Specific Field bit: Return Groups Only (no NSID lists).
    pub const LSP_RGO: u8 = 1 << 0;

    /// ANA states (Figure 228 byte 16 bits 3:0; NVMe base 2.0 §8.1.3).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    #[repr(u8)]
    pub enum AnaState {
        /// ANA Optimized.
        Optimized = 0x01,
        /// ANA Non-Optimized.
        NonOptimized = 0x02,
        /// ANA Inaccessible.
        Inaccessible = 0x03,
        /// ANA Persistent Loss.
        PersistentLoss = 0x04,
        /// ANA Change (in transition).
        Change = 0x0F,
    }

    impl AnaState {
        /// Decodes the state nibble; `None` for reserved values.
        pub const fn from_u8(v: u8) -> Option<Self> {
            match v & 0x0F {
                0x01 => Some(Self::Optimized),
                0x02 => Some(Self::NonOptimized),
                0x03 => Some(Self::Inaccessible),
                0x04 => Some(Self::PersistentLoss),
                0x0F => Some(Self::Change),
                _ => None,
            }
        }

        /// True for the states in which I/O may be sent (optimized, non-optimized).
        pub const fn is_accessible(self) -> bool {
            matches!(self, Self::Optimized | Self::NonOptimized)
        }
    }

    /// The log header.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Header {
        /// Change Count.
        pub chgcnt: u64,
        /// Number of ANA Group Descriptors.
        pub ngrps: u16,
    }

    impl Header {
        /// Decodes the header; `None` when `b` is shorter than 16 bytes.
        pub fn decode(b: &[u8]) -> Option<Self> {
            let h = b.get(..HEADER_LEN)?;
            Some(Self {
                chgcnt: le::u64_at(h, 0),
                ngrps: le::u16_at(h, 8),
            })
        }

        /// Encodes into the first 16 bytes of `b` (nothing when shorter).
        pub fn encode(&self, b: &mut [u8]) {
            if let Some(h) = b.get_mut(..HEADER_LEN) {
                h.fill(0);
                le::put_u64(h, 0, self.chgcnt);
                le::put_u16(h, 8, self.ngrps);
            }
        }
    }

    /// An ANA group descriptor without its NSID list.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct GroupDesc {
        /// ANA Group ID.
        pub grpid: u32,
        /// Number of NSID values that follow.
        pub nnsids: u32,
        /// Change Count.
        pub chgcnt: u64,
        /// ANA state (raw, bits 3:0; see [`AnaState::from_u8`]).
        pub state: u8,
    }

    impl GroupDesc {
        /// Decodes the 32-byte descriptor at the start of `b`.
        pub fn decode(b: &[u8]) -> Option<Self> {
            let d = b.get(..DESC_LEN)?;
            Some(Self {
                grpid: le::u32_at(d, 0),
                nnsids: le::u32_at(d, 4),
                chgcnt: le::u64_at(d, 8),
                state: le::u8_at(d, 16) & 0x0F,
            })
        }

        /// Encodes the descriptor followed by `nsids` at the start of `b`; returns the bytes
        /// written (0 when `b` is too short; `nnsids` is taken from `nsids.len()`).
        pub fn encode(&self, nsids: &[u32], b: &mut [u8]) -> usize {
            let len = DESC_LEN + 4 * nsids.len();
            let Some(d) = b.get_mut(..len) else {
                return 0;
            };
            d.fill(0);
            le::put_u32(d, 0, self.grpid);
            le::put_u32(d, 4, nsids.len() as u32);
            le::put_u64(d, 8, self.chgcnt);
            le::put_u8(d, 16, self.state & 0x0F);
            for (i, n) in nsids.iter().enumerate() {
                le::put_u32(d, DESC_LEN + 4 * i, *n);
            }
            len
        }
    }

    /// Walks the group descriptors of a log read into `b`. Stops (without panicking) at the
    /// header's NGRPS or where a descriptor or its NSID list would run past `b`.
    #[derive(Debug, Clone)]
    pub struct Groups<'a> {
        b: &'a [u8],
        at: usize,
        left: u16,
    }

    /// The descriptors of an ANA log (see [`Groups`]); `None` when `b` has no full header.
    pub fn groups(b: &[u8]) -> Option<(Header, Groups<'_>)> {
        let h = Header::decode(b)?;
        Some((
            h,
            Groups {
                b,
                at: HEADER_LEN,
                left: h.ngrps,
            },
        ))
    }

    impl<'a> Iterator for Groups<'a> {
        /// A descriptor and the bytes of its NSID list (4 bytes per NSID).
        type Item = (GroupDesc, &'a [u8]);

        fn next(&mut self) -> Option<Self::Item> {
            if self.left == 0 {
                return None;
            }
            let d = GroupDesc::decode(self.b.get(self.at..)?)?;
            let start = self.at.checked_add(DESC_LEN)?;
            let end = start.checked_add((d.nnsids as usize).checked_mul(4)?)?;
            let nsids = self.b.get(start..end)?;
            self.at = end;
            self.left -= 1;
            Some((d, nsids))
        }
    }

    /// The state of group `grpid` in a log read into `b`, if the group is listed.
    pub fn group_state(b: &[u8], grpid: u32) -> Option<u8> {
        let (_, mut g) = groups(b)?;
        g.find(|(d, _)| d.grpid == grpid).map(|(d, _)| d.state)
    }

    /// Log size in bytes for `groups` descriptors and `nsids` NSIDs in all.
    pub const fn log_len(groups: usize, nsids: usize) -> usize {
        HEADER_LEN + groups * DESC_LEN + nsids * 4
    }

    /// A Get Log Page SQE for `len` bytes of the ANA log at offset 0 (`rgo`: groups only;
    /// `rae`: keep the asynchronous event outstanding).
    pub fn get_log_page_sqe(cid: u16, rgo: bool, rae: bool, len: u32) -> Sqe {
        let mut s = super::GetLogPageCommand::to_sqe(
            cid,
            0,
            crate::LogPageId::AsymmetricNamespaceAccess as u8,
            rae,
            0,
            len,
        );
        if rgo {
            s.cdw[0] |= (LSP_RGO as u32) << 8;
        }
        s
    }
}

/// Copies the part of `src` (which sits at byte `src_off` of a log) that overlaps the window
/// `[win_off, win_off + out.len())` into `out`. Used to serve log pages at any offset and
/// length without materializing the whole log.
pub fn copy_window(out: &mut [u8], win_off: u64, src: &[u8], src_off: u64) {
    let win_end = win_off.saturating_add(out.len() as u64);
    let src_end = src_off.saturating_add(src.len() as u64);
    let start = win_off.max(src_off);
    let end = win_end.min(src_end);
    if start >= end {
        return;
    }
    let n = (end - start) as usize;
    let o = (start - win_off) as usize;
    let s = (start - src_off) as usize;
    if let (Some(d), Some(x)) = (out.get_mut(o..o + n), src.get(s..s + n)) {
        d.copy_from_slice(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn get_log_page_fields() {
        // Discovery log, 4096 bytes at offset 0x1_0000_0400: NUMD = 1023.
        let s = GetLogPageCommand::to_sqe(1, 0, 0x70, true, 0x1_0000_0400, 4096);
        let b = s.to_bytes();
        assert_eq!(&b[40..44], &[0x70, 0x80, 0xff, 0x03]);
        assert_eq!(&b[44..48], &[0, 0, 0, 0]);
        assert_eq!(&b[48..56], &[0, 4, 0, 0, 1, 0, 0, 0]);
        let c = GetLogPageCommand::from_sqe(&s);
        assert_eq!(
            (c.lid, c.rae, c.numd, c.offset),
            (0x70, true, 1023, 0x1_0000_0400)
        );
        assert_eq!(c.len_bytes(), 4096);
        // NUMDU carries the upper 16 bits.
        let big = GetLogPageCommand::to_sqe(1, 0, 2, false, 0, 0x40_0000);
        assert_eq!(GetLogPageCommand::from_sqe(&big).numd, 0x0f_ffff);
    }

    #[test]
    fn discovery_entry_offsets() {
        let mut traddr = [0u8; 256];
        traddr[..8].copy_from_slice(b"10.0.0.2");
        let mut trsvcid = [0u8; 32];
        trsvcid[..4].copy_from_slice(b"4420");
        let e = discovery::Entry {
            trtype: discovery::TRTYPE_TCP,
            adrfam: discovery::ADRFAM_IPV4,
            subtype: discovery::SUBTYPE_NVM,
            treq: 0,
            portid: 1,
            cntlid: 0xFFFF,
            asqsz: 32,
            trsvcid,
            traddr,
            subnqn: crate::identify::nqn_field("nqn.s"),
            tsas: [0; 256],
        };
        let mut b = [0u8; 1024];
        e.encode(&mut b);
        assert_eq!(&b[0..10], &[3, 1, 2, 0, 1, 0, 0xff, 0xff, 32, 0]);
        assert_eq!(&b[32..37], b"4420\0");
        assert_eq!(&b[256..262], b"nqn.s\0");
        assert_eq!(&b[512..521], b"10.0.0.2\0");
        let d = discovery::Entry::decode(&b);
        assert_eq!(d, e);
        assert_eq!(d.traddr_str(), Some("10.0.0.2"));
        let mut h = [0u8; 1024];
        discovery::Header {
            genctr: 5,
            numrec: 2,
            recfmt: 0,
        }
        .encode(&mut h);
        assert_eq!(
            &h[0..18],
            &[5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn smart_and_slots() {
        let s = SmartLog {
            composite_temperature: 298,
            available_spare: 100,
            data_units_read: SmartLog::data_units(512_001),
            host_write_commands: 7,
            ..Default::default()
        };
        assert_eq!(s.data_units_read, 2);
        let mut b = [0u8; 512];
        s.encode(&mut b);
        assert_eq!(&b[1..4], &[0x2a, 0x01, 100]);
        assert_eq!(b[32], 2);
        assert_eq!(b[80], 7);
        assert_eq!(SmartLog::decode(&b), s);
        encode_firmware_slot(1, &[*b"0.1.0   "], &mut b);
        assert_eq!(b[0], 1);
        assert_eq!(&b[8..16], b"0.1.0   ");
        let mut p = [0u8; 4096];
        encode_changed_ns_list(&[1, 5], false, &mut p);
        assert_eq!(&p[0..12], &[1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]);
        encode_changed_ns_list(&[1], true, &mut p);
        assert_eq!(&p[0..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        encode_effects(
            &[(0x06, Effects::CSUPP)],
            &[(0x01, Effects::CSUPP | Effects::LBCC)],
            &mut p,
        );
        assert_eq!(p[24], 1);
        assert_eq!(p[1028], 3);
        let mut e = [0u8; 64];
        let entry = ErrorLogEntry {
            error_count: 1,
            sqid: 2,
            cid: 3,
            status: 0x8100,
            param_error_location: ErrorLogEntry::location(40, 0),
            lba: 0x0102_0304_0506_0708,
            nsid: 0x0a0b_0c0d,
            trtype: 3,
        };
        entry.encode(&mut e);
        // Linux struct nvme_error_slot: error_count 0, sqid 8, cmdid 10, status_field 12,
        // param_error_location 14, lba 16, nsid 24, vs 28, trtype 29.
        assert_eq!(&e[0..14], &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 0, 0x81]);
        assert_eq!(&e[14..16], &[40, 0]);
        assert_eq!(&e[16..24], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&e[24..30], &[0x0d, 0x0c, 0x0b, 0x0a, 0, 3]);
        assert!(e[30..].iter().all(|&x| x == 0));
        assert_eq!(ErrorLogEntry::decode(&e), entry);
        // Bits 10:8 = bit in the byte: CDW12 bit 30 (FUA) is byte 51, bit 6.
        assert_eq!(ErrorLogEntry::location(51, 6), 0x0633);
    }

    #[test]
    fn ana_log_known_answer() {
        // Two groups, bytes laid out as Linux's `struct nvme_ana_rsp_hdr` (le64 chgcnt,
        // le16 ngrps, le16 rsvd10[3]) and `struct nvme_ana_group_desc` (le32 grpid, le32
        // nnsids, le64 chgcnt, u8 state, u8 rsvd17[15], le32 nsids[]), i.e. NVMe base 2.0
        // Figures 227-228.
        #[rustfmt::skip]
        let log: [u8; 16 + 32 + 8 + 32] = [
            // header: CHGCNT 0x0102030405060708, NGRPS 2, reserved
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x02, 0x00, 0, 0, 0, 0, 0, 0,
            // group 1: GRPID 1, NNSIDS 2, CHGCNT 5, state 01h (optimized)
            0x01, 0, 0, 0, 0x02, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0, 0,
            0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            // its NSIDs 1 and 3
            0x01, 0, 0, 0, 0x03, 0, 0, 0,
            // group 0x0A0B0C0D: no NSIDs, CHGCNT 6, state 0Fh (change)
            0x0D, 0x0C, 0x0B, 0x0A, 0, 0, 0, 0, 0x06, 0, 0, 0, 0, 0, 0, 0,
            0x0F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let (h, g) = ana::groups(&log).unwrap();
        assert_eq!(
            h,
            ana::Header {
                chgcnt: 0x0102_0304_0506_0708,
                ngrps: 2
            }
        );
        let v: Vec<_> = g.collect();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0].0,
            ana::GroupDesc {
                grpid: 1,
                nnsids: 2,
                chgcnt: 5,
                state: 1
            }
        );
        assert_eq!(v[0].1, &[1, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(v[1].0.grpid, 0x0A0B_0C0D);
        assert_eq!(
            ana::AnaState::from_u8(v[1].0.state),
            Some(ana::AnaState::Change)
        );
        assert_eq!(ana::group_state(&log, 1), Some(1));
        assert_eq!(ana::group_state(&log, 7), None);
        assert_eq!(ana::log_len(2, 2), log.len());
        // The encoders produce the same bytes.
        let mut out = [0xEEu8; 16 + 32 + 8 + 32];
        h.encode(&mut out);
        let n = v[0].0.encode(&[1, 3], &mut out[16..]);
        assert_eq!(n, 40);
        v[1].0.encode(&[], &mut out[56..]);
        assert_eq!(out, log);
        // A truncated log yields the complete descriptors only.
        assert_eq!(ana::groups(&log[..60]).unwrap().1.count(), 1);
        assert!(ana::groups(&log[..15]).is_none());
        // States (Linux `enum nvme_ana_state`).
        assert_eq!(
            ana::AnaState::from_u8(0x04),
            Some(ana::AnaState::PersistentLoss)
        );
        assert_eq!(ana::AnaState::from_u8(0x05), None);
        assert!(ana::AnaState::NonOptimized.is_accessible());
        assert!(!ana::AnaState::Inaccessible.is_accessible());
        // Get Log Page 0Ch, RGO (LSP bit 0 = CDW10 bit 8), 4096 bytes: NUMDL 1023.
        let s = ana::get_log_page_sqe(3, true, false, 4096).to_bytes();
        assert_eq!(s[0], 0x02);
        assert_eq!(&s[40..44], &[0x0C, 0x01, 0xff, 0x03]);
        let c = GetLogPageCommand::from_sqe(&ana::get_log_page_sqe(3, true, true, 4096));
        assert_eq!((c.lid, c.lsp, c.rae), (0x0C, 1, true));
    }

    proptest! {
        #[test]
        fn ana_walk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some((h, g)) = ana::groups(&bytes) {
                prop_assert!(g.count() <= h.ngrps as usize);
            }
        }

        #[test]
        fn window_matches_model(src_off in 0u64..64, src_len in 0usize..64,
                                win_off in 0u64..128, win_len in 0usize..64) {
            let src: Vec<u8> = (0..src_len).map(|i| i as u8 + 1).collect();
            let mut out = vec![0u8; win_len];
            copy_window(&mut out, win_off, &src, src_off);
            for (i, b) in out.iter().enumerate() {
                let pos = win_off + i as u64;
                let expect = if pos >= src_off && pos < src_off + src_len as u64 {
                    src[(pos - src_off) as usize]
                } else { 0 };
                prop_assert_eq!(*b, expect);
            }
        }
    }
}
