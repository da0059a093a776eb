//! NVMe data structures shared by every Keel transport, the controller core and the host tools.
//!
//! Everything here is plain data with byte-exact little-endian encoding; nothing allocates and
//! no decoder can panic on any input (all decoders take fixed-size arrays or use checked slice
//! access).
//!
//! Specification references (section numbers of NVMe Base 2.0 unless noted):
//! - [`sqe`]: Submission Queue Entry, common command format (§4.2, Figure 88), PRP entries
//!   (§4.1.1), SGL descriptors (§4.1.2, Figures 90-101).
//! - [`cqe`]: Completion Queue Entry (§4.2.3, Figure 89) and the Status field (§4.2.3.2,
//!   Figures 93-100: generic, command specific, media and data integrity status codes),
//!   NVMe-oF 1.1 §3.3 Figure 21 / §7 fabrics status codes.
//! - [`opcode`]: admin opcodes (Figure 138), NVM command set I/O opcodes (NVM Command Set 1.0
//!   Figure 18), fabrics command types (NVMe-oF 1.1 §3.3 Figure 11), feature identifiers
//!   (§5.27.1, Figure 317), log page identifiers (§5.16, Figure 202).
//! - [`identify`]: Identify command (§5.17): Identify Controller (Figure 275), Identify
//!   Namespace (NVM Command Set 1.0 §4.1.5.1, Figure 97), Active Namespace ID list (CNS 02h),
//!   Namespace Identification Descriptor list (CNS 03h, Figures 276-278).
//! - [`log`]: log pages (§5.16.1): Error Information (01h), SMART / Health Information (02h),
//!   Firmware Slot Information (03h), Changed Namespace List (04h), Commands Supported and
//!   Effects (05h), Discovery log page (70h, NVMe-oF 1.1 §5.3 Figures 37-38).
//! - [`fabrics`]: Connect command and Connect data (NVMe-oF 1.1 §3.3, Figures 19-21),
//!   Property Get / Set (§3.4, §3.5), Disconnect (§3.6).
//! - [`regs`]: controller properties / registers CAP, VS, CC, CSTS, AQA (§3.1.3, Figures
//!   36-52).
//! - I/O command fields: Read/Write/Compare/Write Zeroes/Verify/Dataset Management (NVM
//!   Command Set 1.0 §3.2, §3.3) and Copy with source range format 0h (NVM Command Set 2.0
//!   §3.3.1) in [`io`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cqe;
pub mod fabrics;
pub mod identify;
pub mod io;
pub mod le;
pub mod log;
pub mod opcode;
pub mod regs;
pub mod sqe;

pub use cqe::{Cqe, Status};
pub use opcode::{AdminOpcode, FabricsType, FeatureId, IoOpcode, LogPageId};
pub use sqe::{DataDirection, SglDescriptor, Sqe};

/// The well-known NQN of the discovery subsystem (NVMe base 2.0 §4.5 / NVMe-oF 1.1 §5).
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Size in bytes of an NQN field on the wire (NUL-terminated, at most 223 bytes of UTF-8).
pub const NQN_FIELD_LEN: usize = 256;

/// Largest NQN length in bytes (NVMe base 2.0 §4.5).
pub const NQN_MAX_LEN: usize = 223;

/// The broadcast namespace identifier.
pub const NSID_ALL: u32 = 0xFFFF_FFFF;
