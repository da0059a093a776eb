//! What NVMe/TCP makes of a command capsule's data pointer (NVMe/TCP 1.0 §3.4.1 / §3.4.2:
//! in-capsule data or a transport SGL; NVMe base 2.0 §4.1.2 SGL descriptor, Figures 99-100).
//! Everything else about the SQE and CQE is [`keel_nvme::Sqe`] / [`keel_nvme::Cqe`].

use keel_nvme::Sqe;
use keel_nvme::le;
use keel_nvme::sqe::{sgl_subtype, sgl_type};

/// SGL identifier (byte 15 of the descriptor): Data Block (0h), subtype Offset (1h): in-capsule.
pub const SGL_IN_CAPSULE: u8 = (sgl_type::DATA_BLOCK << 4) | sgl_subtype::OFFSET;
/// SGL identifier: Transport SGL Data Block (5h), subtype Transport Specific (Ah).
pub const SGL_TRANSPORT: u8 =
    (sgl_type::TRANSPORT_DATA_BLOCK << 4) | sgl_subtype::TRANSPORT_SPECIFIC;

/// SGL1 as the transport judges it: the address, the length in bytes 11:8 and the identifier
/// byte, whatever the descriptor type (a keyed descriptor, whose length has another layout, is
/// refused on TCP anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sgl1 {
    /// Address (bytes 7:0): the offset into in-capsule data for [`SGL_IN_CAPSULE`].
    pub address: u64,
    /// Length (bytes 11:8).
    pub length: u32,
    /// SGL identifier (byte 15): type in the high nibble, subtype in the low nibble.
    pub id: u8,
}

impl Sgl1 {
    /// SGL1 of `sqe`.
    pub fn of(sqe: &Sqe) -> Self {
        Self {
            address: le::u64_at(&sqe.dptr, 0),
            length: le::u32_at(&sqe.dptr, 8),
            id: sqe.dptr[15],
        }
    }
}
