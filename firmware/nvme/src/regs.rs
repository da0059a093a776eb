//! Controller properties (registers) (NVMe base 2.0 §3.1.3, Figures 36-52). On fabrics they
//! are reached by Property Get/Set; on PCIe they are BAR0 registers.

/// Property offsets (Figure 35).
pub mod offset {
    /// Controller Capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version (4 bytes).
    pub const VS: u32 = 0x08;
    /// Interrupt Mask Set (4 bytes, PCIe only).
    pub const INTMS: u32 = 0x0C;
    /// Interrupt Mask Clear (4 bytes, PCIe only).
    pub const INTMC: u32 = 0x10;
    /// Controller Configuration (4 bytes).
    pub const CC: u32 = 0x14;
    /// Controller Status (4 bytes).
    pub const CSTS: u32 = 0x1C;
    /// NVM Subsystem Reset (4 bytes).
    pub const NSSR: u32 = 0x20;
    /// Admin Queue Attributes (4 bytes, PCIe only).
    pub const AQA: u32 = 0x24;
    /// Admin Submission Queue Base Address (8 bytes, PCIe only).
    pub const ASQ: u32 = 0x28;
    /// Admin Completion Queue Base Address (8 bytes, PCIe only).
    pub const ACQ: u32 = 0x30;
}

/// Controller Capabilities (CAP, Figure 36).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// Builds CAP from its fields. `mqes` is 0's based; `to` is in 500 ms units; `css` is the
    /// command sets bit field (bit 0 = NVM command set); page sizes are 2^(12+n).
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        mqes: u16,
        cqr: bool,
        ams: u8,
        to: u8,
        dstrd: u8,
        nssrs: bool,
        css: u8,
        mpsmin: u8,
        mpsmax: u8,
    ) -> Self {
        Cap((mqes as u64)
            | ((cqr as u64) << 16)
            | (((ams & 0x3) as u64) << 17)
            | ((to as u64) << 24)
            | (((dstrd & 0xF) as u64) << 32)
            | ((nssrs as u64) << 36)
            | ((css as u64) << 37)
            | (((mpsmin & 0xF) as u64) << 48)
            | (((mpsmax & 0xF) as u64) << 52))
    }
    /// Maximum Queue Entries Supported (0's based).
    pub const fn mqes(&self) -> u16 {
        self.0 as u16
    }
    /// Contiguous Queues Required.
    pub const fn cqr(&self) -> bool {
        self.0 & (1 << 16) != 0
    }
    /// Arbitration Mechanism Supported.
    pub const fn ams(&self) -> u8 {
        ((self.0 >> 17) & 0x3) as u8
    }
    /// Timeout (500 ms units).
    pub const fn to(&self) -> u8 {
        (self.0 >> 24) as u8
    }
    /// Doorbell Stride.
    pub const fn dstrd(&self) -> u8 {
        ((self.0 >> 32) & 0xF) as u8
    }
    /// NVM Subsystem Reset Supported.
    pub const fn nssrs(&self) -> bool {
        self.0 & (1 << 36) != 0
    }
    /// Command Sets Supported.
    pub const fn css(&self) -> u8 {
        (self.0 >> 37) as u8
    }
    /// Memory Page Size Minimum (2^(12+n)).
    pub const fn mpsmin(&self) -> u8 {
        ((self.0 >> 48) & 0xF) as u8
    }
    /// Memory Page Size Maximum (2^(12+n)).
    pub const fn mpsmax(&self) -> u8 {
        ((self.0 >> 52) & 0xF) as u8
    }
}

/// Version (VS, Figure 37).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vs(pub u32);

impl Vs {
    /// NVMe 1.4.0.
    pub const V1_4: Vs = Vs::new(1, 4, 0);
    /// NVMe 2.0.0.
    pub const V2_0: Vs = Vs::new(2, 0, 0);
    /// Builds a version.
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Vs(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }
    /// Major version.
    pub const fn major(&self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Minor version.
    pub const fn minor(&self) -> u8 {
        (self.0 >> 8) as u8
    }
}

/// Controller Configuration (CC, Figure 41).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc(pub u32);

impl Cc {
    /// Shutdown notification: none.
    pub const SHN_NONE: u8 = 0;
    /// Shutdown notification: normal.
    pub const SHN_NORMAL: u8 = 1;
    /// Shutdown notification: abrupt.
    pub const SHN_ABRUPT: u8 = 2;

    /// Builds CC from its fields.
    pub const fn new(en: bool, css: u8, mps: u8, ams: u8, shn: u8, iosqes: u8, iocqes: u8) -> Self {
        Cc((en as u32)
            | (((css & 0x7) as u32) << 4)
            | (((mps & 0xF) as u32) << 7)
            | (((ams & 0x7) as u32) << 11)
            | (((shn & 0x3) as u32) << 14)
            | (((iosqes & 0xF) as u32) << 16)
            | (((iocqes & 0xF) as u32) << 20))
    }
    /// Enable.
    pub const fn en(&self) -> bool {
        self.0 & 1 != 0
    }
    /// I/O Command Set Selected.
    pub const fn css(&self) -> u8 {
        ((self.0 >> 4) & 0x7) as u8
    }
    /// Memory Page Size (2^(12+n)).
    pub const fn mps(&self) -> u8 {
        ((self.0 >> 7) & 0xF) as u8
    }
    /// Arbitration Mechanism Selected.
    pub const fn ams(&self) -> u8 {
        ((self.0 >> 11) & 0x7) as u8
    }
    /// Shutdown Notification.
    pub const fn shn(&self) -> u8 {
        ((self.0 >> 14) & 0x3) as u8
    }
    /// I/O Submission Queue Entry Size (2^n).
    pub const fn iosqes(&self) -> u8 {
        ((self.0 >> 16) & 0xF) as u8
    }
    /// I/O Completion Queue Entry Size (2^n).
    pub const fn iocqes(&self) -> u8 {
        ((self.0 >> 20) & 0xF) as u8
    }
}

/// Controller Status (CSTS, Figure 43).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Csts(pub u32);

impl Csts {
    /// Shutdown status: normal operation.
    pub const SHST_NORMAL: u8 = 0;
    /// Shutdown status: shutdown processing occurring.
    pub const SHST_OCCURRING: u8 = 1;
    /// Shutdown status: shutdown processing complete.
    pub const SHST_COMPLETE: u8 = 2;

    /// Ready.
    pub const fn rdy(&self) -> bool {
        self.0 & 1 != 0
    }
    /// Controller Fatal Status.
    pub const fn cfs(&self) -> bool {
        self.0 & 2 != 0
    }
    /// Shutdown Status.
    pub const fn shst(&self) -> u8 {
        ((self.0 >> 2) & 0x3) as u8
    }
    /// Sets RDY.
    pub fn set_rdy(&mut self, v: bool) {
        self.0 = (self.0 & !1) | v as u32;
    }
    /// Sets CFS.
    pub fn set_cfs(&mut self, v: bool) {
        self.0 = (self.0 & !2) | ((v as u32) << 1);
    }
    /// Sets SHST.
    pub fn set_shst(&mut self, v: u8) {
        self.0 = (self.0 & !0xC) | (((v & 0x3) as u32) << 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_linux_nvmet_like() {
        // Linux nvmet: CSS NVM (bit 37), TO 15, MQES 127.
        let cap = Cap::new(127, false, 0, 15, 0, false, 1, 0, 0);
        assert_eq!(cap.0, (1u64 << 37) | (15 << 24) | 127);
        assert_eq!(cap.mqes(), 127);
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.css(), 1);
        let cap = Cap::new(0xffff, true, 1, 0, 0xf, true, 0xff, 3, 7);
        assert!(cap.cqr() && cap.nssrs());
        assert_eq!(
            (cap.ams(), cap.dstrd(), cap.mpsmin(), cap.mpsmax()),
            (1, 15, 3, 7)
        );
    }

    #[test]
    fn cc_linux_enable_value() {
        // Linux host enables with IOSQES 6, IOCQES 4, MPS 0, CSS 0, EN 1: 0x00460001.
        let cc = Cc::new(true, 0, 0, 0, 0, 6, 4);
        assert_eq!(cc.0, 0x0046_0001);
        assert!(cc.en());
        assert_eq!((cc.iosqes(), cc.iocqes(), cc.shn()), (6, 4, 0));
        assert_eq!(Cc(0x0046_4001).shn(), Cc::SHN_NORMAL);
    }

    #[test]
    fn csts_and_vs() {
        let mut s = Csts::default();
        s.set_rdy(true);
        s.set_shst(Csts::SHST_COMPLETE);
        assert_eq!(s.0, 0b1001);
        s.set_cfs(true);
        assert!(s.cfs() && s.rdy());
        assert_eq!(Vs::V1_4.0, 0x0001_0400);
        assert_eq!(Vs::V2_0.major(), 2);
    }
}
