//! The few SQE/CQE fields the transport needs (NVMe base 2.0 §4.1 figure 88 common command
//! format; §4.2.1 SGL descriptors; §4.2.2 completion queue entry; NVMe-oF 1.1 §3.3 fabrics
//! command format). This crate deliberately does not depend on the NVMe command-set crate:
//! capsules are raw `[u8; 64]` / `[u8; 16]`.

use crate::pdu::{get_u16, get_u32, get_u64, put_u16, put_u32, put_u64};

/// Opcode of every fabrics command (fctype at byte 4 says which).
pub const FABRICS_OPCODE: u8 = 0x7F;
/// SGL identifier (byte 15 of the descriptor): Data Block (0h), subtype Offset (1h): in-capsule.
pub const SGL_IN_CAPSULE: u8 = 0x01;
/// SGL identifier: Transport SGL Data Block (5h), subtype Transport Specific (Ah).
pub const SGL_TRANSPORT: u8 = 0x5A;

/// Data transfer direction of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// No data.
    None,
    /// Host to controller (write-like).
    HostToController,
    /// Controller to host (read-like).
    ControllerToHost,
    /// Bidirectional (not used on NVMe/TCP by this crate; treated as controller to host).
    Bidirectional,
}

/// Opcode (byte 0).
pub fn opcode(sqe: &[u8; 64]) -> u8 {
    sqe[0]
}
/// Command identifier (bytes 2-3).
pub fn cid(sqe: &[u8; 64]) -> u16 {
    get_u16(sqe, 2)
}
/// Set the command identifier.
pub fn set_cid(sqe: &mut [u8; 64], cid: u16) {
    put_u16(sqe, 2, cid)
}
/// Fabrics command type (byte 4), meaningful when the opcode is [`FABRICS_OPCODE`].
pub fn fctype(sqe: &[u8; 64]) -> u8 {
    sqe[4]
}
/// Data direction: opcode bits 1:0, or fctype bits 1:0 for fabrics commands.
pub fn direction(sqe: &[u8; 64]) -> Direction {
    let bits = if opcode(sqe) == FABRICS_OPCODE {
        fctype(sqe)
    } else {
        opcode(sqe)
    } & 3;
    match bits {
        0 => Direction::None,
        1 => Direction::HostToController,
        2 => Direction::ControllerToHost,
        _ => Direction::Bidirectional,
    }
}

/// The SGL descriptor in DPTR (SQE bytes 24-39).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sgl {
    /// Address (bytes 24-31): the offset into in-capsule data for [`SGL_IN_CAPSULE`].
    pub address: u64,
    /// Length (bytes 32-35).
    pub length: u32,
    /// SGL identifier (byte 39): type in the high nibble, subtype in the low nibble.
    pub id: u8,
}

/// Read the DPTR SGL descriptor.
pub fn sgl(sqe: &[u8; 64]) -> Sgl {
    Sgl {
        address: get_u64(sqe, 24),
        length: get_u32(sqe, 32),
        id: sqe[39],
    }
}
/// Write the DPTR SGL descriptor (bytes 36-38 are cleared) and set PSDT to 01b (SGL).
pub fn set_sgl(sqe: &mut [u8; 64], s: Sgl) {
    put_u64(sqe, 24, s.address);
    put_u32(sqe, 32, s.length);
    sqe[36..39].fill(0);
    sqe[39] = s.id;
    sqe[1] = (sqe[1] & 0x3F) | 0x40;
}

/// CID of a CQE (bytes 12-13).
pub fn cqe_cid(cqe: &[u8; 16]) -> u16 {
    get_u16(cqe, 12)
}
/// Status field of a CQE (bytes 14-15: phase bit 0, SC bits 8:1, SCT bits 11:9, DNR bit 15).
pub fn cqe_status(cqe: &[u8; 16]) -> u16 {
    get_u16(cqe, 14)
}

/// A command status the transport asks the application to complete a command with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    /// Generic 02h Invalid Field in Command.
    pub const INVALID_FIELD: Self = Self::generic(0x02, true);
    /// Generic 0Fh Data SGL Length Invalid.
    pub const DATA_SGL_LENGTH_INVALID: Self = Self::generic(0x0F, true);
    /// Generic 11h SGL Descriptor Type Invalid.
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Self = Self::generic(0x11, true);
    /// Generic 16h SGL Offset Invalid.
    pub const SGL_OFFSET_INVALID: Self = Self::generic(0x16, true);
    /// Generic 22h Transient Transport Error (retryable): used for data digest errors.
    pub const TRANSIENT_TRANSPORT_ERROR: Self = Self::generic(0x22, false);

    const fn generic(sc: u8, dnr: bool) -> Self {
        Self { sct: 0, sc, dnr }
    }
    /// The CQE status field (bytes 14-15) with the phase bit clear.
    pub const fn to_field(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 7) as u16) << 9) | ((self.dnr as u16) << 15)
    }
}
