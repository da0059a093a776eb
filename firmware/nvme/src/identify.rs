//! Identify data structures (NVMe base 2.0 §5.17).

use crate::le;
use crate::sqe::Sqe;

/// Size of every Identify data structure.
pub const IDENTIFY_LEN: usize = 4096;

/// Controller or Namespace Structure values (Figure 273).
pub mod cns {
    /// Identify Namespace (NVM command set).
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list.
    pub const NS_DESCRIPTOR_LIST: u8 = 0x03;
    /// I/O Command Set specific Identify Namespace (for CSI 00h: the NVM Command Set's).
    pub const CS_NAMESPACE: u8 = 0x05;
    /// I/O Command Set specific Identify Controller (for CSI 00h: the NVM Command Set's).
    pub const CS_CONTROLLER: u8 = 0x06;
    /// Active Namespace ID list of an I/O Command Set.
    pub const CS_ACTIVE_NS_LIST: u8 = 0x07;
    /// I/O Command Set Independent Identify Namespace.
    pub const INDEPENDENT_NAMESPACE: u8 = 0x08;
}

/// I/O Command Set Independent Identify Namespace data structure (NVMe base 2.0 §5.17.2.9;
/// Linux `struct nvme_id_ns_cs_indep`), 4096 bytes: the fields of a namespace that do not
/// depend on its command set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentifyNsIndependent {
    /// Namespace Features (byte 0).
    pub nsfeat: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities (byte 1).
    pub nmic: u8,
    /// Reservation Capabilities (byte 2).
    pub rescap: u8,
    /// Format Progress Indicator (byte 3).
    pub fpi: u8,
    /// ANA Group Identifier (bytes 7:4).
    pub anagrpid: u32,
    /// Namespace Attributes (byte 8).
    pub nsattr: u8,
    /// NVM Set Identifier (bytes 11:10).
    pub nvmsetid: u16,
    /// Endurance Group Identifier (bytes 13:12).
    pub endgid: u16,
    /// Namespace Status (byte 14; bit 0: ready).
    pub nstat: u8,
}

impl IdentifyNsIndependent {
    /// Encodes the structure (the rest of the page zero).
    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        b.fill(0);
        b[0] = self.nsfeat;
        b[1] = self.nmic;
        b[2] = self.rescap;
        b[3] = self.fpi;
        le::put_u32(b, 4, self.anagrpid);
        b[8] = self.nsattr;
        le::put_u16(b, 10, self.nvmsetid);
        le::put_u16(b, 12, self.endgid);
        b[14] = self.nstat;
    }

    /// Decodes the structure.
    pub fn decode(b: &[u8; IDENTIFY_LEN]) -> Self {
        Self {
            nsfeat: b[0],
            nmic: b[1],
            rescap: b[2],
            fpi: b[3],
            anagrpid: le::u32_at(b, 4),
            nsattr: b[8],
            nvmsetid: le::u16_at(b, 10),
            endgid: le::u16_at(b, 12),
            nstat: b[14],
        }
    }
}

/// Identify command fields (Figure 272).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyCommand {
    /// Controller or Namespace Structure (CDW10 bits 7:0).
    pub cns: u8,
    /// Controller Identifier (CDW10 bits 31:16).
    pub cntid: u16,
    /// Command Set Identifier (CDW11 bits 31:24).
    pub csi: u8,
    /// NSID of the command.
    pub nsid: u32,
}

impl IdentifyCommand {
    /// Reads the fields of an Identify SQE.
    pub const fn from_sqe(s: &Sqe) -> Self {
        Self {
            cns: s.cdw[0] as u8,
            cntid: (s.cdw[0] >> 16) as u16,
            csi: (s.cdw[1] >> 24) as u8,
            nsid: s.nsid,
        }
    }

    /// Builds an Identify SQE (caller adds the data pointer).
    pub fn to_sqe(&self, cid: u16) -> Sqe {
        let mut s = Sqe::new(crate::AdminOpcode::Identify as u8, cid).with_nsid(self.nsid);
        s.cdw[0] = self.cns as u32 | ((self.cntid as u32) << 16);
        s.cdw[1] = (self.csi as u32) << 24;
        s
    }
}

/// Controller types (CNTRLTYPE).
pub mod cntrltype {
    /// I/O controller.
    pub const IO: u8 = 1;
    /// Discovery controller.
    pub const DISCOVERY: u8 = 2;
    /// Administrative controller.
    pub const ADMIN: u8 = 3;
}

/// Byte offsets in the Identify Controller data structure (Figure 275).
#[allow(missing_docs)]
pub mod ctrl_field {
    pub const VID: usize = 0;
    pub const SSVID: usize = 2;
    pub const SN: usize = 4;
    pub const MN: usize = 24;
    pub const FR: usize = 64;
    pub const RAB: usize = 72;
    pub const IEEE: usize = 73;
    pub const CMIC: usize = 76;
    pub const MDTS: usize = 77;
    pub const CNTLID: usize = 78;
    pub const VER: usize = 80;
    pub const OAES: usize = 92;
    pub const CTRATT: usize = 96;
    pub const CNTRLTYPE: usize = 111;
    pub const OACS: usize = 256;
    pub const ACL: usize = 258;
    pub const AERL: usize = 259;
    pub const FRMW: usize = 260;
    pub const LPA: usize = 261;
    pub const ELPE: usize = 262;
    pub const NPSS: usize = 263;
    pub const KAS: usize = 320;
    pub const ANATT: usize = 342;
    pub const ANACAP: usize = 343;
    pub const ANAGRPMAX: usize = 344;
    pub const NANAGRPID: usize = 348;
    pub const SQES: usize = 512;
    pub const CQES: usize = 513;
    pub const MAXCMD: usize = 514;
    pub const NN: usize = 516;
    pub const ONCS: usize = 520;
    pub const FUSES: usize = 522;
    pub const FNA: usize = 524;
    pub const VWC: usize = 525;
    pub const AWUN: usize = 526;
    pub const AWUPF: usize = 528;
    pub const OCFS: usize = 534;
    pub const SGLS: usize = 536;
    pub const SUBNQN: usize = 768;
    pub const IOCCSZ: usize = 1792;
    pub const IORCSZ: usize = 1796;
    pub const ICDOFF: usize = 1800;
    pub const FCATT: usize = 1802;
    pub const MSDBD: usize = 1803;
    pub const PSD0: usize = 2048;
}

bitflags::bitflags! {
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities, CMIC (Figure 275,
    /// byte 76). Bits this crate does not name are kept as read.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Cmic: u8 {
        /// Bit 0: the NVM subsystem may contain more than one port.
        const MULTI_PORT = 1 << 0;
        /// Bit 1: the NVM subsystem may contain two or more controllers.
        const MULTI_CONTROLLER = 1 << 1;
        /// Bit 2: the controller is associated with an SR-IOV virtual function.
        const SRIOV = 1 << 2;
        /// Bit 3: Asymmetric Namespace Access Reporting.
        const ANA_REPORTING = 1 << 3;
        const _ = !0;
    }

    /// Controller Attributes, CTRATT (Figure 275, bytes 99:96).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ctratt: u32 {
        /// Bit 0: 128-bit Host Identifier.
        const HOST_ID_128 = 1 << 0;
        /// Bit 1: Non-Operational Power State Permissive Mode.
        const NOPSPM = 1 << 1;
        /// Bit 2: NVM Sets.
        const NVM_SETS = 1 << 2;
        /// Bit 3: Read Recovery Levels.
        const READ_RECOVERY_LEVELS = 1 << 3;
        /// Bit 4: Endurance Groups.
        const ENDURANCE_GROUPS = 1 << 4;
        /// Bit 5: Predictable Latency Mode.
        const PREDICTABLE_LATENCY = 1 << 5;
        /// Bit 6: Traffic Based Keep Alive Support (TBKAS, §3.9.2).
        const TBKAS = 1 << 6;
        const _ = !0;
    }

    /// Optional Admin Command Support, OACS (Figure 275, bytes 257:256).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Oacs: u16 {
        /// Bit 0: Security Send and Security Receive.
        const SECURITY = 1 << 0;
        /// Bit 1: Format NVM.
        const FORMAT_NVM = 1 << 1;
        /// Bit 2: Firmware Commit and Firmware Image Download.
        const FIRMWARE = 1 << 2;
        /// Bit 3: Namespace Management.
        const NS_MANAGEMENT = 1 << 3;
        /// Bit 4: Device Self-test.
        const SELF_TEST = 1 << 4;
        /// Bit 5: Directives.
        const DIRECTIVES = 1 << 5;
        /// Bit 6: NVMe-MI Send and Receive.
        const NVME_MI = 1 << 6;
        /// Bit 7: Virtualization Management.
        const VIRTUALIZATION = 1 << 7;
        /// Bit 8: Doorbell Buffer Config.
        const DOORBELL_BUFFER_CONFIG = 1 << 8;
        /// Bit 9: Get LBA Status.
        const GET_LBA_STATUS = 1 << 9;
        const _ = !0;
    }

    /// Log Page Attributes, LPA (Figure 275, byte 261).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Lpa: u8 {
        /// Bit 0: SMART / Health Information per namespace.
        const SMART_PER_NAMESPACE = 1 << 0;
        /// Bit 1: Commands Supported and Effects log page.
        const COMMAND_EFFECTS = 1 << 1;
        /// Bit 2: extended data for Get Log Page (NUMDU, LPOL/LPOU).
        const EXTENDED_DATA = 1 << 2;
        /// Bit 3: Telemetry Host-Initiated and Controller-Initiated log pages.
        const TELEMETRY = 1 << 3;
        /// Bit 4: Persistent Event log.
        const PERSISTENT_EVENT = 1 << 4;
        const _ = !0;
    }

    /// Optional NVM Command Support, ONCS (Figure 275, bytes 521:520).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Oncs: u16 {
        /// Bit 0: Compare.
        const COMPARE = 1 << 0;
        /// Bit 1: Write Uncorrectable.
        const WRITE_UNCORRECTABLE = 1 << 1;
        /// Bit 2: Dataset Management.
        const DSM = 1 << 2;
        /// Bit 3: Write Zeroes.
        const WRITE_ZEROES = 1 << 3;
        /// Bit 4: Save field in Set Features / Select field in Get Features.
        const SAVE_SELECT = 1 << 4;
        /// Bit 5: Reservations.
        const RESERVATIONS = 1 << 5;
        /// Bit 6: Timestamp feature.
        const TIMESTAMP = 1 << 6;
        /// Bit 7: Verify.
        const VERIFY = 1 << 7;
        /// Bit 8: Copy.
        const COPY = 1 << 8;
        const _ = !0;
    }

    /// Volatile Write Cache, VWC (Figure 275, byte 525).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Vwc: u8 {
        /// Bit 0: a volatile write cache is present.
        const PRESENT = 1 << 0;
        /// Bit 1 (meaningful when bit 2 is set): Flush with NSID FFFFFFFFh is supported
        /// (bits 2:1 = 11b); clear with bit 2 set means not supported (10b).
        const FLUSH_BROADCAST = 1 << 1;
        /// Bit 2: bits 2:1 report Flush-broadcast support (00b: not reported).
        const FLUSH_BROADCAST_REPORTED = 1 << 2;
        const _ = !0;
    }

    /// Optional Copy Formats Supported, OCFS (Figure 275, bytes 535:534).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ocfs: u16 {
        /// Bit 0: Source Range Entries Copy Descriptor Format 0h.
        const FORMAT_0 = 1 << 0;
        /// Bit 1: Copy Descriptor Format 1h.
        const FORMAT_1 = 1 << 1;
        const _ = !0;
    }
}

/// The fields of Identify Controller a Keel controller fills. Everything else encodes as 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial Number (ASCII, space padded).
    pub sn: [u8; 20],
    /// Model Number (ASCII, space padded).
    pub mn: [u8; 40],
    /// Firmware Revision (ASCII, space padded).
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI.
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities.
    pub cmic: Cmic,
    /// Maximum Data Transfer Size (2^n × CAP.MPSMIN; 0 = no limit).
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version (same encoding as VS).
    pub ver: u32,
    /// Optional Asynchronous Events Supported.
    pub oaes: u32,
    /// Controller Attributes.
    pub ctratt: Ctratt,
    /// Controller Type.
    pub cntrltype: u8,
    /// Optional Admin Command Support.
    pub oacs: Oacs,
    /// Abort Command Limit (0's based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0's based).
    pub aerl: u8,
    /// Firmware Updates.
    pub frmw: u8,
    /// Log Page Attributes.
    pub lpa: Lpa,
    /// Error Log Page Entries (0's based).
    pub elpe: u8,
    /// Number of Power States Support (0's based).
    pub npss: u8,
    /// Keep Alive Support (granularity in 100 ms units; 0 = not supported).
    pub kas: u16,
    /// ANA Transition Time (seconds).
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities.
    pub anacap: u8,
    /// ANA Group Identifier Maximum.
    pub anagrpmax: u32,
    /// Number of ANA Group Identifiers.
    pub nanagrpid: u32,
    /// Submission Queue Entry Size (required bits 3:0, maximum bits 7:4).
    pub sqes: u8,
    /// Completion Queue Entry Size.
    pub cqes: u8,
    /// Maximum Outstanding Commands (fabrics).
    pub maxcmd: u16,
    /// Number of Namespaces (largest NSID).
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: Oncs,
    /// Fused Operation Support.
    pub fuses: u16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache.
    pub vwc: Vwc,
    /// Atomic Write Unit Normal (0's based).
    pub awun: u16,
    /// Atomic Write Unit Power Fail (0's based).
    pub awupf: u16,
    /// Optional Copy Formats Supported.
    pub ocfs: Ocfs,
    /// SGL Support.
    pub sgls: u32,
    /// NVM Subsystem NQN (NUL padded).
    pub subnqn: [u8; 256],
    /// I/O Queue Command Capsule Supported Size (16-byte units).
    pub ioccsz: u32,
    /// I/O Queue Response Capsule Supported Size (16-byte units).
    pub iorcsz: u32,
    /// In Capsule Data Offset (16-byte units).
    pub icdoff: u16,
    /// Fabrics Controller Attributes (bit 0: static controller model).
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors.
    pub msdbd: u8,
}

impl Default for IdentifyController {
    fn default() -> Self {
        Self {
            vid: 0,
            ssvid: 0,
            sn: [b' '; 20],
            mn: [b' '; 40],
            fr: [b' '; 8],
            rab: 0,
            ieee: [0; 3],
            cmic: Cmic::empty(),
            mdts: 0,
            cntlid: 0,
            ver: 0,
            oaes: 0,
            ctratt: Ctratt::empty(),
            cntrltype: 0,
            oacs: Oacs::empty(),
            acl: 0,
            aerl: 0,
            frmw: 0,
            lpa: Lpa::empty(),
            elpe: 0,
            npss: 0,
            kas: 0,
            anatt: 0,
            anacap: 0,
            anagrpmax: 0,
            nanagrpid: 0,
            sqes: 0,
            cqes: 0,
            maxcmd: 0,
            nn: 0,
            oncs: Oncs::empty(),
            fuses: 0,
            fna: 0,
            vwc: Vwc::empty(),
            awun: 0,
            awupf: 0,
            ocfs: Ocfs::empty(),
            sgls: 0,
            subnqn: [0; 256],
            ioccsz: 0,
            iorcsz: 0,
            icdoff: 0,
            fcatt: 0,
            msdbd: 0,
        }
    }
}

/// Space-padded ASCII field from a string (truncated).
pub fn ascii_field<const N: usize>(s: &str) -> [u8; N] {
    let mut a = [b' '; N];
    le::put_str(&mut a, 0, N, s, b' ');
    a
}

/// NUL-padded NQN field from a string (truncated to 255 bytes so it stays terminated).
pub fn nqn_field(s: &str) -> [u8; 256] {
    let mut a = [0u8; 256];
    le::put_str(&mut a, 0, 255, s, 0);
    a
}

impl IdentifyController {
    /// Encodes the 4096-byte structure.
    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        use ctrl_field::*;
        b.fill(0);
        le::put_u16(b, VID, self.vid);
        le::put_u16(b, SSVID, self.ssvid);
        le::put_bytes(b, SN, &self.sn);
        le::put_bytes(b, MN, &self.mn);
        le::put_bytes(b, FR, &self.fr);
        le::put_u8(b, RAB, self.rab);
        le::put_bytes(b, IEEE, &self.ieee);
        le::put_u8(b, CMIC, self.cmic.bits());
        le::put_u8(b, MDTS, self.mdts);
        le::put_u16(b, CNTLID, self.cntlid);
        le::put_u32(b, VER, self.ver);
        le::put_u32(b, OAES, self.oaes);
        le::put_u32(b, CTRATT, self.ctratt.bits());
        le::put_u8(b, CNTRLTYPE, self.cntrltype);
        le::put_u16(b, OACS, self.oacs.bits());
        le::put_u8(b, ACL, self.acl);
        le::put_u8(b, AERL, self.aerl);
        le::put_u8(b, FRMW, self.frmw);
        le::put_u8(b, LPA, self.lpa.bits());
        le::put_u8(b, ELPE, self.elpe);
        le::put_u8(b, NPSS, self.npss);
        le::put_u16(b, KAS, self.kas);
        le::put_u8(b, ANATT, self.anatt);
        le::put_u8(b, ANACAP, self.anacap);
        le::put_u32(b, ANAGRPMAX, self.anagrpmax);
        le::put_u32(b, NANAGRPID, self.nanagrpid);
        le::put_u8(b, SQES, self.sqes);
        le::put_u8(b, CQES, self.cqes);
        le::put_u16(b, MAXCMD, self.maxcmd);
        le::put_u32(b, NN, self.nn);
        le::put_u16(b, ONCS, self.oncs.bits());
        le::put_u16(b, FUSES, self.fuses);
        le::put_u8(b, FNA, self.fna);
        le::put_u8(b, VWC, self.vwc.bits());
        le::put_u16(b, AWUN, self.awun);
        le::put_u16(b, AWUPF, self.awupf);
        le::put_u16(b, OCFS, self.ocfs.bits());
        le::put_u32(b, SGLS, self.sgls);
        le::put_bytes(b, SUBNQN, &self.subnqn);
        le::put_u32(b, IOCCSZ, self.ioccsz);
        le::put_u32(b, IORCSZ, self.iorcsz);
        le::put_u16(b, ICDOFF, self.icdoff);
        le::put_u8(b, FCATT, self.fcatt);
        le::put_u8(b, MSDBD, self.msdbd);
    }

    /// Decodes the fields this type carries.
    pub fn decode(b: &[u8; IDENTIFY_LEN]) -> Self {
        use ctrl_field::*;
        Self {
            vid: le::u16_at(b, VID),
            ssvid: le::u16_at(b, SSVID),
            sn: le::array_at(b, SN),
            mn: le::array_at(b, MN),
            fr: le::array_at(b, FR),
            rab: le::u8_at(b, RAB),
            ieee: le::array_at(b, IEEE),
            cmic: Cmic::from_bits_retain(le::u8_at(b, CMIC)),
            mdts: le::u8_at(b, MDTS),
            cntlid: le::u16_at(b, CNTLID),
            ver: le::u32_at(b, VER),
            oaes: le::u32_at(b, OAES),
            ctratt: Ctratt::from_bits_retain(le::u32_at(b, CTRATT)),
            cntrltype: le::u8_at(b, CNTRLTYPE),
            oacs: Oacs::from_bits_retain(le::u16_at(b, OACS)),
            acl: le::u8_at(b, ACL),
            aerl: le::u8_at(b, AERL),
            frmw: le::u8_at(b, FRMW),
            lpa: Lpa::from_bits_retain(le::u8_at(b, LPA)),
            elpe: le::u8_at(b, ELPE),
            npss: le::u8_at(b, NPSS),
            kas: le::u16_at(b, KAS),
            anatt: le::u8_at(b, ANATT),
            anacap: le::u8_at(b, ANACAP),
            anagrpmax: le::u32_at(b, ANAGRPMAX),
            nanagrpid: le::u32_at(b, NANAGRPID),
            sqes: le::u8_at(b, SQES),
            cqes: le::u8_at(b, CQES),
            maxcmd: le::u16_at(b, MAXCMD),
            nn: le::u32_at(b, NN),
            oncs: Oncs::from_bits_retain(le::u16_at(b, ONCS)),
            fuses: le::u16_at(b, FUSES),
            fna: le::u8_at(b, FNA),
            vwc: Vwc::from_bits_retain(le::u8_at(b, VWC)),
            awun: le::u16_at(b, AWUN),
            awupf: le::u16_at(b, AWUPF),
            ocfs: Ocfs::from_bits_retain(le::u16_at(b, OCFS)),
            sgls: le::u32_at(b, SGLS),
            subnqn: le::array_at(b, SUBNQN),
            ioccsz: le::u32_at(b, IOCCSZ),
            iorcsz: le::u32_at(b, IORCSZ),
            icdoff: le::u16_at(b, ICDOFF),
            fcatt: le::u8_at(b, FCATT),
            msdbd: le::u8_at(b, MSDBD),
        }
    }
}

/// An LBA Format (NVM Command Set Figure 98).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LbaFormat {
    /// Metadata Size in bytes.
    pub ms: u16,
    /// LBA Data Size as a power of two (9 = 512 bytes, 12 = 4096 bytes).
    pub lbads: u8,
    /// Relative Performance (2 bits).
    pub rp: u8,
}

impl LbaFormat {
    /// Encodes as a dword.
    pub const fn to_u32(&self) -> u32 {
        self.ms as u32 | ((self.lbads as u32) << 16) | (((self.rp & 3) as u32) << 24)
    }
    /// Decodes a dword.
    pub const fn from_u32(v: u32) -> Self {
        Self {
            ms: v as u16,
            lbads: (v >> 16) as u8,
            rp: ((v >> 24) & 3) as u8,
        }
    }
}

/// Byte offsets in Identify Namespace (NVM Command Set 1.0 Figure 97).
#[allow(missing_docs)]
pub mod ns_field {
    pub const NSZE: usize = 0;
    pub const NCAP: usize = 8;
    pub const NUSE: usize = 16;
    pub const NSFEAT: usize = 24;
    pub const NLBAF: usize = 25;
    pub const FLBAS: usize = 26;
    pub const NMIC: usize = 30;
    pub const DLFEAT: usize = 33;
    pub const ANAGRPID: usize = 92;
    pub const MSSRL: usize = 74;
    pub const MCL: usize = 76;
    pub const MSRC: usize = 80;
    pub const NGUID: usize = 104;
    pub const EUI64: usize = 120;
    pub const LBAF0: usize = 128;
}

/// The fields of Identify Namespace a Keel controller fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentifyNamespace {
    /// Namespace Size in logical blocks.
    pub nsze: u64,
    /// Namespace Capacity.
    pub ncap: u64,
    /// Namespace Utilization.
    pub nuse: u64,
    /// Namespace Features.
    pub nsfeat: u8,
    /// Number of LBA Formats (0's based).
    pub nlbaf: u8,
    /// Formatted LBA Size (bits 3:0 index of the LBA format in use).
    pub flbas: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities.
    pub nmic: u8,
    /// Deallocate Logical Block Features.
    pub dlfeat: u8,
    /// ANA Group Identifier (0: the namespace is in no ANA group).
    pub anagrpid: u32,
    /// Maximum Single Source Range Length of a Copy (logical blocks).
    pub mssrl: u16,
    /// Maximum Copy Length (logical blocks).
    pub mcl: u32,
    /// Maximum Source Range Count of a Copy (0's based).
    pub msrc: u8,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// LBA formats 0..15 (only `nlbaf + 1` are meaningful).
    pub lbaf: [LbaFormat; 16],
}

impl IdentifyNamespace {
    /// Encodes the 4096-byte structure.
    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        use ns_field::*;
        b.fill(0);
        le::put_u64(b, NSZE, self.nsze);
        le::put_u64(b, NCAP, self.ncap);
        le::put_u64(b, NUSE, self.nuse);
        le::put_u8(b, NSFEAT, self.nsfeat);
        le::put_u8(b, NLBAF, self.nlbaf);
        le::put_u8(b, FLBAS, self.flbas);
        le::put_u8(b, NMIC, self.nmic);
        le::put_u8(b, DLFEAT, self.dlfeat);
        le::put_u32(b, ANAGRPID, self.anagrpid);
        le::put_u16(b, MSSRL, self.mssrl);
        le::put_u32(b, MCL, self.mcl);
        le::put_u8(b, MSRC, self.msrc);
        le::put_bytes(b, NGUID, &self.nguid);
        le::put_bytes(b, EUI64, &self.eui64);
        for (i, f) in self.lbaf.iter().enumerate() {
            le::put_u32(b, LBAF0 + 4 * i, f.to_u32());
        }
    }

    /// Decodes the fields this type carries.
    pub fn decode(b: &[u8; IDENTIFY_LEN]) -> Self {
        use ns_field::*;
        let mut lbaf = [LbaFormat::default(); 16];
        for (i, f) in lbaf.iter_mut().enumerate() {
            *f = LbaFormat::from_u32(le::u32_at(b, LBAF0 + 4 * i));
        }
        Self {
            nsze: le::u64_at(b, NSZE),
            ncap: le::u64_at(b, NCAP),
            nuse: le::u64_at(b, NUSE),
            nsfeat: le::u8_at(b, NSFEAT),
            nlbaf: le::u8_at(b, NLBAF),
            flbas: le::u8_at(b, FLBAS),
            nmic: le::u8_at(b, NMIC),
            dlfeat: le::u8_at(b, DLFEAT),
            anagrpid: le::u32_at(b, ANAGRPID),
            mssrl: le::u16_at(b, MSSRL),
            mcl: le::u32_at(b, MCL),
            msrc: le::u8_at(b, MSRC),
            nguid: le::array_at(b, NGUID),
            eui64: le::array_at(b, EUI64),
            lbaf,
        }
    }

    /// Block size in bytes of the format in use (0 if LBADS is out of range).
    pub fn block_size(&self) -> u32 {
        let i = (self.flbas & 0xF) as usize;
        let lbads = self.lbaf.get(i).map(|f| f.lbads).unwrap_or(0);
        if (9..32).contains(&lbads) {
            1 << lbads
        } else {
            0
        }
    }
}

/// Writes an Active Namespace ID list (CNS 02h): the NSIDs in `nsids` greater than
/// `after`, ascending, at most 1024, zero terminated. `nsids` need not be sorted.
pub fn encode_active_ns_list(after: u32, nsids: &[u32], b: &mut [u8; IDENTIFY_LEN]) {
    b.fill(0);
    let mut last = after;
    for slot in 0..IDENTIFY_LEN / 4 {
        // Smallest NSID > last: O(n) per entry, n is the namespace count of one subsystem.
        let next = nsids.iter().copied().filter(|&n| n > last).min();
        match next {
            Some(n) => {
                le::put_u32(b, slot * 4, n);
                last = n;
            }
            None => break,
        }
    }
}

/// Reads a namespace ID list (Active Namespace ID list, CNS 02h; Changed Namespace List log,
/// 04h): little-endian NSIDs, ended by the first zero entry or the end of `b`.
pub fn nsid_list(b: &[u8]) -> impl Iterator<Item = u32> + '_ {
    b.chunks_exact(4)
        .map(|c| le::u32_at(c, 0))
        .take_while(|&n| n != 0)
}

/// Namespace Identifier Types (Figure 278).
pub mod nidt {
    /// IEEE Extended Unique Identifier (8 bytes).
    pub const EUI64: u8 = 1;
    /// Namespace Globally Unique Identifier (16 bytes).
    pub const NGUID: u8 = 2;
    /// Namespace UUID (16 bytes).
    pub const UUID: u8 = 3;
    /// Command Set Identifier (1 byte).
    pub const CSI: u8 = 4;
}

/// Namespace identifiers reported in a Namespace Identification Descriptor list (CNS 03h).
/// All-zero identifiers are omitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NsIdentifiers {
    /// EUI-64.
    pub eui64: [u8; 8],
    /// NGUID.
    pub nguid: [u8; 16],
    /// UUID.
    pub uuid: [u8; 16],
    /// Command Set Identifier (0 = NVM).
    pub csi: u8,
}

impl NsIdentifiers {
    /// Encodes the descriptor list (Figure 277): NIDT, NIDL, 2 reserved bytes, NID.
    pub fn encode(&self, b: &mut [u8; IDENTIFY_LEN]) {
        b.fill(0);
        let mut off = 0;
        let mut put = |t: u8, id: &[u8]| {
            le::put_u8(b, off, t);
            le::put_u8(b, off + 1, id.len() as u8);
            le::put_bytes(b, off + 4, id);
            off += 4 + id.len();
        };
        if self.eui64 != [0; 8] {
            put(nidt::EUI64, &self.eui64);
        }
        if self.nguid != [0; 16] {
            put(nidt::NGUID, &self.nguid);
        }
        if self.uuid != [0; 16] {
            put(nidt::UUID, &self.uuid);
        }
        put(nidt::CSI, &[self.csi]);
    }

    /// Decodes a descriptor list, ignoring unknown types; stops at NIDL 0 or the end.
    pub fn decode(b: &[u8; IDENTIFY_LEN]) -> Self {
        let mut r = Self::default();
        let mut off = 0usize;
        while off + 4 <= IDENTIFY_LEN {
            let t = le::u8_at(b, off);
            let l = le::u8_at(b, off + 1) as usize;
            if l == 0 {
                break;
            }
            let id = b.get(off + 4..off + 4 + l).unwrap_or(&[]);
            match (t, l) {
                (nidt::EUI64, 8) => r.eui64 = le::array_at(id, 0),
                (nidt::NGUID, 16) => r.nguid = le::array_at(id, 0),
                (nidt::UUID, 16) => r.uuid = le::array_at(id, 0),
                (nidt::CSI, 1) => r.csi = le::u8_at(id, 0),
                _ => {}
            }
            off += 4 + l;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identify_controller_offsets() {
        let mut c = IdentifyController {
            vid: 0x1b36,
            ssvid: 0x1af4,
            sn: ascii_field("SN123"),
            mn: ascii_field("Keel"),
            fr: ascii_field("0.1"),
            rab: 6,
            ieee: [0x11, 0x22, 0x33],
            cmic: Cmic::MULTI_CONTROLLER,
            mdts: 5,
            cntlid: 0x0102,
            ver: 0x0001_0400,
            oaes: 1 << 8,
            ctratt: Ctratt::HOST_ID_128,
            cntrltype: cntrltype::IO,
            acl: 3,
            aerl: 3,
            frmw: 3,
            lpa: Lpa::COMMAND_EFFECTS | Lpa::EXTENDED_DATA,
            elpe: 0,
            kas: 10,
            anatt: 10,
            anacap: 0x5F,
            anagrpmax: 0x0102_0304,
            nanagrpid: 0x0A0B_0C0D,
            sqes: 0x66,
            cqes: 0x44,
            maxcmd: 128,
            nn: 32,
            oncs: Oncs::COMPARE | Oncs::DSM | Oncs::WRITE_ZEROES,
            vwc: Vwc::PRESENT | Vwc::FLUSH_BROADCAST_REPORTED,
            sgls: 0x0010_0005,
            subnqn: nqn_field("nqn.x"),
            ioccsz: 260,
            iorcsz: 1,
            msdbd: 1,
            ..Default::default()
        };
        c.awupf = 0x0707;
        c.ocfs = Ocfs::FORMAT_0;
        let mut b = [0u8; IDENTIFY_LEN];
        c.encode(&mut b);
        assert_eq!(&b[0..4], &[0x36, 0x1b, 0xf4, 0x1a]);
        assert_eq!(&b[4..10], b"SN123 ");
        assert_eq!(b[23], b' ');
        assert_eq!(&b[24..29], b"Keel ");
        assert_eq!(&b[64..68], b"0.1 ");
        assert_eq!(b[72], 6);
        assert_eq!(&b[73..76], &[0x11, 0x22, 0x33]);
        assert_eq!(b[76], 2);
        assert_eq!(b[77], 5);
        assert_eq!(&b[78..80], &[0x02, 0x01]);
        assert_eq!(&b[80..84], &[0x00, 0x04, 0x01, 0x00]);
        assert_eq!(&b[92..96], &[0, 1, 0, 0]);
        assert_eq!(b[96], 1);
        assert_eq!(b[111], 1);
        assert_eq!((b[258], b[259], b[260], b[261]), (3, 3, 3, 6));
        assert_eq!(&b[320..322], &[10, 0]);
        // Linux `struct nvme_id_ctrl`: u8 anatt @342, u8 anacap @343, le32 anagrpmax @344,
        // le32 nanagrpid @348 (after le16 endgidmax @340).
        assert_eq!((b[342], b[343]), (10, 0x5F));
        assert_eq!(&b[344..352], &[4, 3, 2, 1, 0x0D, 0x0C, 0x0B, 0x0A]);
        assert_eq!((b[512], b[513]), (0x66, 0x44));
        assert_eq!(&b[514..516], &[128, 0]);
        assert_eq!(&b[516..520], &[32, 0, 0, 0]);
        assert_eq!(&b[520..522], &[0x0d, 0]);
        assert_eq!(b[525], 5);
        assert_eq!(&b[528..530], &[7, 7]);
        // OCFS: Linux `struct nvme_id_ctrl` ocfs at byte 534 (after acwu at 532).
        assert_eq!(&b[534..536], &[1, 0]);
        assert_eq!(&b[536..540], &[5, 0, 0x10, 0]);
        assert_eq!(&b[768..774], b"nqn.x\0");
        assert_eq!(&b[1792..1796], &[4, 1, 0, 0]);
        assert_eq!(&b[1796..1800], &[1, 0, 0, 0]);
        assert_eq!(b[1803], 1);
        assert_eq!(IdentifyController::decode(&b), c);
    }

    #[test]
    fn identify_namespace_offsets() {
        let mut lbaf = [LbaFormat::default(); 16];
        lbaf[0] = LbaFormat {
            ms: 0,
            lbads: 12,
            rp: 0,
        };
        let n = IdentifyNamespace {
            nsze: 0x1_0000,
            ncap: 0x1_0000,
            nuse: 0x8000,
            nsfeat: 1,
            nlbaf: 0,
            flbas: 0,
            nmic: 1,
            dlfeat: 0x9,
            anagrpid: 0x1122_3344,
            mssrl: 0x0102,
            mcl: 0x0304_0506,
            msrc: 0x7f,
            nguid: [7; 16],
            eui64: [9; 8],
            lbaf,
        };
        let mut b = [0u8; IDENTIFY_LEN];
        n.encode(&mut b);
        assert_eq!(&b[0..8], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..18], &[0, 0x80]);
        assert_eq!((b[24], b[25], b[26], b[30], b[33]), (1, 0, 0, 1, 9));
        // Linux `struct nvme_id_ns`: le32 anagrpid @92 (after rsvd81[11] @81).
        assert_eq!(&b[92..96], &[0x44, 0x33, 0x22, 0x11]);
        // Copy limits (Linux `struct nvme_id_ns`: mssrl at byte 74, mcl at 76, msrc at 80).
        assert_eq!(&b[74..81], &[0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 0x7f]);
        assert_eq!(&b[104..120], &[7; 16]);
        assert_eq!(&b[120..128], &[9; 8]);
        assert_eq!(&b[128..132], &[0, 0, 12, 0]);
        assert_eq!(IdentifyNamespace::decode(&b), n);
        assert_eq!(n.block_size(), 4096);
    }

    #[test]
    fn active_list_and_descriptors() {
        let mut b = [0u8; IDENTIFY_LEN];
        encode_active_ns_list(1, &[7, 1, 3], &mut b);
        assert_eq!(&b[0..12], &[3, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        let ids = NsIdentifiers {
            eui64: [0; 8],
            nguid: [0xAB; 16],
            uuid: [0xCD; 16],
            csi: 0,
        };
        ids.encode(&mut b);
        assert_eq!(&b[0..4], &[2, 16, 0, 0]);
        assert_eq!(&b[20..24], &[3, 16, 0, 0]);
        assert_eq!(&b[40..45], &[4, 1, 0, 0, 0]);
        assert_eq!(NsIdentifiers::decode(&b), ids);
        let cmd = IdentifyCommand {
            cns: 1,
            cntid: 0,
            csi: 0,
            nsid: 0,
        };
        assert_eq!(IdentifyCommand::from_sqe(&cmd.to_sqe(1)), cmd);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(seed in any::<u64>(), fill in any::<u8>()) {
            let mut b = [fill; IDENTIFY_LEN];
            for (i, x) in b.iter_mut().enumerate() {
                *x ^= (seed.rotate_left(i as u32 % 64) as u8).wrapping_add(i as u8);
            }
            let _ = NsIdentifiers::decode(&b);
            let n = IdentifyNamespace::decode(&b);
            let _ = n.block_size();
            let c = IdentifyController::decode(&b);
            let mut out = [0u8; IDENTIFY_LEN];
            c.encode(&mut out);
            prop_assert_eq!(IdentifyController::decode(&out), c);
        }
    }
}
