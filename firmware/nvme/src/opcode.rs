//! Opcodes, fabrics command types, feature and log page identifiers.

/// The opcode shared by all fabrics commands (NVMe-oF 1.1 §3.3).
pub const FABRICS_OPCODE: u8 = 0x7F;

macro_rules! code_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $n:expr,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vm])* $v = $n,)*
        }

        impl $name {
            /// Decodes a raw value; `None` for values this crate does not know.
            pub const fn from_u8(v: u8) -> Option<Self> {
                match v {
                    $($n => Some(Self::$v),)*
                    _ => None,
                }
            }
        }

        impl From<$name> for u8 {
            fn from(v: $name) -> u8 {
                v as u8
            }
        }
    };
}

code_enum! {
    /// Admin command opcodes (NVMe base 2.0 Figure 138).
    AdminOpcode {
        /// Delete I/O Submission Queue.
        DeleteIoSq = 0x00,
        /// Create I/O Submission Queue.
        CreateIoSq = 0x01,
        /// Get Log Page.
        GetLogPage = 0x02,
        /// Delete I/O Completion Queue.
        DeleteIoCq = 0x04,
        /// Create I/O Completion Queue.
        CreateIoCq = 0x05,
        /// Identify.
        Identify = 0x06,
        /// Abort.
        Abort = 0x08,
        /// Set Features.
        SetFeatures = 0x09,
        /// Get Features.
        GetFeatures = 0x0A,
        /// Asynchronous Event Request.
        AsyncEventRequest = 0x0C,
        /// Namespace Management.
        NamespaceManagement = 0x0D,
        /// Firmware Commit.
        FirmwareCommit = 0x10,
        /// Firmware Image Download.
        FirmwareImageDownload = 0x11,
        /// Device Self-test.
        DeviceSelfTest = 0x14,
        /// Namespace Attachment.
        NamespaceAttachment = 0x15,
        /// Keep Alive.
        KeepAlive = 0x18,
        /// Directive Send.
        DirectiveSend = 0x19,
        /// Directive Receive.
        DirectiveReceive = 0x1A,
        /// Virtualization Management.
        VirtualizationManagement = 0x1C,
        /// NVMe-MI Send.
        NvmeMiSend = 0x1D,
        /// NVMe-MI Receive.
        NvmeMiReceive = 0x1E,
        /// Doorbell Buffer Config.
        DoorbellBufferConfig = 0x7C,
        /// Fabrics command (see [`FabricsType`]).
        Fabrics = 0x7F,
        /// Format NVM.
        FormatNvm = 0x80,
        /// Security Send.
        SecuritySend = 0x81,
        /// Security Receive.
        SecurityReceive = 0x82,
        /// Sanitize.
        Sanitize = 0x84,
        /// Get LBA Status.
        GetLbaStatus = 0x86,
    }
}

code_enum! {
    /// NVM command set I/O opcodes (NVM Command Set 1.0 Figure 18).
    IoOpcode {
        /// Flush.
        Flush = 0x00,
        /// Write.
        Write = 0x01,
        /// Read.
        Read = 0x02,
        /// Write Uncorrectable.
        WriteUncorrectable = 0x04,
        /// Compare.
        Compare = 0x05,
        /// Write Zeroes.
        WriteZeroes = 0x08,
        /// Dataset Management.
        DatasetManagement = 0x09,
        /// Verify.
        Verify = 0x0C,
        /// Reservation Register.
        ReservationRegister = 0x0D,
        /// Reservation Report.
        ReservationReport = 0x0E,
        /// Reservation Acquire.
        ReservationAcquire = 0x11,
        /// Reservation Release.
        ReservationRelease = 0x15,
        /// Copy.
        Copy = 0x19,
        /// Fabrics command (see [`FabricsType`]).
        Fabrics = 0x7F,
    }
}

code_enum! {
    /// Fabrics command types, FCTYPE (NVMe-oF 1.1 Figure 11).
    FabricsType {
        /// Property Set.
        PropertySet = 0x00,
        /// Connect.
        Connect = 0x01,
        /// Property Get.
        PropertyGet = 0x04,
        /// Authentication Send.
        AuthenticationSend = 0x05,
        /// Authentication Receive.
        AuthenticationReceive = 0x06,
        /// Disconnect.
        Disconnect = 0x08,
    }
}

code_enum! {
    /// Feature identifiers (NVMe base 2.0 Figure 317).
    FeatureId {
        /// Arbitration.
        Arbitration = 0x01,
        /// Power Management.
        PowerManagement = 0x02,
        /// LBA Range Type.
        LbaRangeType = 0x03,
        /// Temperature Threshold.
        TemperatureThreshold = 0x04,
        /// Error Recovery.
        ErrorRecovery = 0x05,
        /// Volatile Write Cache.
        VolatileWriteCache = 0x06,
        /// Number of Queues.
        NumberOfQueues = 0x07,
        /// Interrupt Coalescing.
        InterruptCoalescing = 0x08,
        /// Interrupt Vector Configuration.
        InterruptVectorConfig = 0x09,
        /// Write Atomicity Normal.
        WriteAtomicity = 0x0A,
        /// Asynchronous Event Configuration.
        AsyncEventConfig = 0x0B,
        /// Autonomous Power State Transition.
        AutonomousPowerState = 0x0C,
        /// Host Memory Buffer.
        HostMemoryBuffer = 0x0D,
        /// Timestamp.
        Timestamp = 0x0E,
        /// Keep Alive Timer.
        KeepAliveTimer = 0x0F,
        /// Host Controlled Thermal Management.
        HostThermalManagement = 0x10,
        /// Host Identifier.
        HostIdentifier = 0x81,
        /// Reservation Notification Mask.
        ReservationNotificationMask = 0x82,
        /// Reservation Persistence.
        ReservationPersistence = 0x83,
    }
}

code_enum! {
    /// Log page identifiers (NVMe base 2.0 Figure 202, NVMe-oF 1.1 §5.3).
    LogPageId {
        /// Supported Log Pages.
        SupportedLogPages = 0x00,
        /// Error Information.
        ErrorInformation = 0x01,
        /// SMART / Health Information.
        SmartHealth = 0x02,
        /// Firmware Slot Information.
        FirmwareSlot = 0x03,
        /// Changed Namespace List.
        ChangedNamespaceList = 0x04,
        /// Commands Supported and Effects.
        CommandsSupportedAndEffects = 0x05,
        /// Device Self-test.
        DeviceSelfTest = 0x06,
        /// Telemetry Host-Initiated.
        TelemetryHost = 0x07,
        /// Asymmetric Namespace Access (§5.16.1.12).
        AsymmetricNamespaceAccess = 0x0C,
        /// Discovery (NVMe-oF).
        Discovery = 0x70,
    }
}

/// Asynchronous event types and information (NVMe base 2.0 §5.2, Figures 146-151).
pub mod async_event {
    /// Event type: Notice.
    pub const TYPE_NOTICE: u8 = 0x2;
    /// Notice: Namespace Attribute Changed.
    pub const NOTICE_NS_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Notice: Asymmetric Namespace Access Change (Figure 151; log page 0Ch).
    pub const NOTICE_ANA_CHANGE: u8 = 0x03;
    /// Notice: Discovery Log Page Change.
    pub const NOTICE_DISCOVERY_LOG_CHANGE: u8 = 0xF0;
    /// Asynchronous Event Configuration bit: Namespace Attribute Notices.
    pub const AEC_NS_ATTRIBUTE: u32 = 1 << 8;
    /// Asynchronous Event Configuration bit (and Identify Controller OAES bit): Asymmetric
    /// Namespace Access Change Notices (Figure 325 bit 11).
    pub const AEC_ANA_CHANGE: u32 = 1 << 11;
    /// Asynchronous Event Configuration bit: Discovery Log Page Change Notices.
    pub const AEC_DISCOVERY_LOG_CHANGE: u32 = 1 << 31;

    /// Completion DW0 of an Asynchronous Event Request.
    pub const fn dw0(event_type: u8, info: u8, log_page: u8) -> u32 {
        (event_type as u32 & 0x7) | ((info as u32) << 8) | ((log_page as u32) << 16)
    }

    /// Splits an Asynchronous Event Request completion DW0 into (event type, information,
    /// log page identifier) (Figure 146).
    pub const fn parse_dw0(dw0: u32) -> (u8, u8, u8) {
        ((dw0 & 0x7) as u8, (dw0 >> 8) as u8, (dw0 >> 16) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_all_bytes() {
        for v in 0..=255u8 {
            if let Some(o) = AdminOpcode::from_u8(v) {
                assert_eq!(u8::from(o), v);
            }
            if let Some(o) = IoOpcode::from_u8(v) {
                assert_eq!(u8::from(o), v);
            }
            if let Some(o) = FabricsType::from_u8(v) {
                assert_eq!(u8::from(o), v);
            }
            if let Some(o) = FeatureId::from_u8(v) {
                assert_eq!(u8::from(o), v);
            }
        }
        assert_eq!(AdminOpcode::from_u8(0x18), Some(AdminOpcode::KeepAlive));
        assert_eq!(IoOpcode::from_u8(0x03), None);
        assert_eq!(async_event::dw0(2, 0, 4), 0x0004_0002);
        // An ANA change notice (Linux: NVME_AER_NOTICE_ANA = 0x03, NVME_LOG_ANA = 0x0c).
        assert_eq!(async_event::dw0(2, 3, 0x0C), 0x000C_0302);
        assert_eq!(async_event::parse_dw0(0x000C_0302), (2, 3, 0x0C));
        assert_eq!(
            LogPageId::from_u8(0x0C),
            Some(LogPageId::AsymmetricNamespaceAccess)
        );
    }
}
