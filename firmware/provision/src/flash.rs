//! The flash layout of QEMU `virt`'s 64 MiB pflash bank 0: two firmware slots and a
//! configuration area kept as two copies (see the crate documentation for the byte map).
//!
//! A configuration copy is valid when its magic, version, length and CRC32C are right. The
//! reader takes the valid copy with the highest sequence number ([`choose_config`]); the
//! writer always overwrites the *other* copy ([`next_config_write`]), so a write torn by a
//! power cut spoils at most the copy being written and the previous configuration stays.

use alloc::vec::Vec;
use keel_crc32c::Crc32c;

/// CRC32C over a copy's header bytes followed by its payload.
fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(header);
    c.update(payload);
    c.finish()
}

/// Size of the flash bank.
pub const FLASH_SIZE: usize = 64 << 20;
/// Erase granule of QEMU's `cfi.pflash01` on `virt` (256 KiB sectors); every region below is
/// aligned to it.
pub const SECTOR_SIZE: usize = 256 << 10;
/// Size of one firmware slot, its header sector included.
pub const SLOT_SIZE: usize = 0x1F0_0000;
/// Largest raw image a slot holds (the slot less its header sector).
pub const SLOT_PAYLOAD_MAX: usize = SLOT_SIZE - SECTOR_SIZE;
/// Start of the configuration area.
pub const CONFIG_OFFSET: usize = 2 * SLOT_SIZE;
/// Size of one configuration copy.
pub const CONFIG_COPY_SIZE: usize = 1 << 20;
/// Bytes of a configuration copy's header.
pub const CONFIG_HEADER_LEN: usize = 32;
/// Largest payload (bundle) a configuration copy holds.
pub const CONFIG_PAYLOAD_MAX: usize = CONFIG_COPY_SIZE - CONFIG_HEADER_LEN;
/// Magic of a configuration copy.
pub const CONFIG_MAGIC: [u8; 4] = *b"KCFG";
/// Format version of a configuration copy's header.
pub const CONFIG_VERSION: u16 = 1;

const _: () = assert!(CONFIG_OFFSET + 2 * CONFIG_COPY_SIZE == FLASH_SIZE);
const _: () =
    assert!(SLOT_SIZE.is_multiple_of(SECTOR_SIZE) && CONFIG_COPY_SIZE.is_multiple_of(SECTOR_SIZE));

/// A firmware slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot A: starts at flash offset 0, where the CPU starts executing on a flash boot.
    A,
    /// Slot B: the update slot.
    B,
}

impl Slot {
    /// Flash offset of the slot, which is where its raw image starts.
    pub const fn base(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => SLOT_SIZE,
        }
    }

    /// Flash offset of the slot's image header: the slot's last sector.
    pub const fn header_offset(self) -> usize {
        self.base() + SLOT_PAYLOAD_MAX
    }

    /// The slot's name.
    pub const fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

/// A configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigCopy {
    /// The first copy.
    A,
    /// The second copy.
    B,
}

impl ConfigCopy {
    /// Flash offset of the copy.
    pub const fn offset(self) -> usize {
        match self {
            ConfigCopy::A => CONFIG_OFFSET,
            ConfigCopy::B => CONFIG_OFFSET + CONFIG_COPY_SIZE,
        }
    }

    /// The copy's name.
    pub const fn name(self) -> &'static str {
        match self {
            ConfigCopy::A => "A",
            ConfigCopy::B => "B",
        }
    }
}

/// Why a payload cannot be stored as a configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadTooLarge {
    /// Its length.
    pub len: usize,
}

impl core::fmt::Display for PayloadTooLarge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "a configuration of {} bytes does not fit a {CONFIG_PAYLOAD_MAX}-byte configuration copy",
            self.len
        )
    }
}

/// Encodes a configuration copy (header and payload; the rest of the copy's region is left
/// as it is, erased flash reading 0xFF).
pub fn encode_config_copy(sequence: u64, payload: &[u8]) -> Result<Vec<u8>, PayloadTooLarge> {
    if payload.len() > CONFIG_PAYLOAD_MAX {
        return Err(PayloadTooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(CONFIG_HEADER_LEN + payload.len());
    out.extend_from_slice(&CONFIG_MAGIC);
    out.extend_from_slice(&CONFIG_VERSION.to_le_bytes());
    out.extend_from_slice(&(CONFIG_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let crc = crc_of(&out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// A valid configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigEntry<'a> {
    /// Its sequence number.
    pub sequence: u64,
    /// Its payload (a bundle).
    pub payload: &'a [u8],
}

/// Reads a configuration copy's region (or a prefix of it holding at least the copy):
/// `None` when erased, torn or corrupt.
pub fn parse_config_copy(region: &[u8]) -> Option<ConfigEntry<'_>> {
    let h = region.get(..CONFIG_HEADER_LEN)?;
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if h[..4] != CONFIG_MAGIC
        || u16_at(4) != CONFIG_VERSION
        || usize::from(u16_at(6)) != CONFIG_HEADER_LEN
        || h[20..28] != [0; 8]
    {
        return None;
    }
    let len = u32_at(16) as usize;
    if len > CONFIG_PAYLOAD_MAX {
        return None;
    }
    let payload = region.get(CONFIG_HEADER_LEN..CONFIG_HEADER_LEN + len)?;
    let crc = crc_of(&h[..28], payload);
    if crc != u32_at(28) {
        return None;
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&h[8..16]);
    Some(ConfigEntry {
        sequence: u64::from_le_bytes(seq),
        payload,
    })
}

/// The copy in force: the valid copy with the highest sequence number (copy A on a tie, which
/// [`next_config_write`] never produces).
pub fn chosen_config<'a>(a: &'a [u8], b: &'a [u8]) -> Option<(ConfigCopy, ConfigEntry<'a>)> {
    match (parse_config_copy(a), parse_config_copy(b)) {
        (Some(ea), Some(eb)) if eb.sequence > ea.sequence => Some((ConfigCopy::B, eb)),
        (Some(ea), _) => Some((ConfigCopy::A, ea)),
        (None, Some(eb)) => Some((ConfigCopy::B, eb)),
        (None, None) => None,
    }
}

/// The payload of the configuration in force (see [`chosen_config`]), given the regions of
/// copy A and copy B.
pub fn choose_config<'a>(a: &'a [u8], b: &'a [u8]) -> Option<&'a [u8]> {
    chosen_config(a, b).map(|(_, e)| e.payload)
}

/// Where and with which sequence number the next configuration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The copy to overwrite: never the one in force.
    pub copy: ConfigCopy,
    /// The sequence number to write: one more than the highest valid one (1 on empty flash).
    pub sequence: u64,
}

/// Which copy the next configuration overwrites, given the regions of copy A and copy B: an
/// invalid copy if there is one, else the older; never the copy in force.
pub fn next_config_write(a: &[u8], b: &[u8]) -> ConfigWrite {
    let (ea, eb) = (parse_config_copy(a), parse_config_copy(b));
    let seq = |e: Option<ConfigEntry<'_>>| e.map(|e| e.sequence);
    let newest = seq(ea).max(seq(eb)).unwrap_or(0);
    let sequence = newest.saturating_add(1);
    let copy = match chosen_config(a, b) {
        Some((ConfigCopy::A, _)) => ConfigCopy::B,
        Some((ConfigCopy::B, _)) => ConfigCopy::A,
        None => ConfigCopy::A,
    };
    ConfigWrite { copy, sequence }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn region(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut r = encode_config_copy(seq, payload).unwrap();
        r.resize(4096, 0xff);
        r
    }

    #[test]
    fn layout() {
        assert_eq!(Slot::A.base(), 0);
        assert_eq!(Slot::A.header_offset(), 0x1EC_0000);
        assert_eq!(Slot::B.base(), 0x1F0_0000);
        assert_eq!(Slot::B.header_offset(), 0x3DC_0000);
        assert_eq!(ConfigCopy::A.offset(), 0x3E0_0000);
        assert_eq!(ConfigCopy::B.offset(), 0x3F0_0000);
    }

    #[test]
    fn empty_flash_has_no_config_and_writes_copy_a_first() {
        let erased = vec![0xff; 4096];
        assert_eq!(choose_config(&erased, &erased), None);
        assert_eq!(
            next_config_write(&erased, &erased),
            ConfigWrite {
                copy: ConfigCopy::A,
                sequence: 1
            }
        );
    }

    #[test]
    fn newest_valid_copy_wins_and_a_corrupt_one_falls_back() {
        let a = region(7, b"seven");
        let mut b = region(8, b"eight");
        assert_eq!(choose_config(&a, &b), Some(&b"eight"[..]));
        assert_eq!(next_config_write(&a, &b).copy, ConfigCopy::A);
        assert_eq!(next_config_write(&a, &b).sequence, 9);
        b[CONFIG_HEADER_LEN + 2] ^= 4;
        assert_eq!(choose_config(&a, &b), Some(&b"seven"[..]));
        assert_eq!(
            next_config_write(&a, &b),
            ConfigWrite {
                copy: ConfigCopy::B,
                sequence: 8
            }
        );
    }

    #[test]
    fn torn_write_keeps_the_previous_copy() {
        let a = region(1, &[0x5a; 1000]);
        let full = region(2, &[0xa5; 1000]);
        for cut in [0, 1, 16, 31, 32, 500, 1031] {
            let mut b = vec![0xff; 4096];
            b[..cut].copy_from_slice(&full[..cut]);
            assert_eq!(
                choose_config(&a, &b),
                Some(&[0x5a; 1000][..]),
                "cut at {cut}"
            );
        }
        assert_eq!(choose_config(&a, &full), Some(&[0xa5; 1000][..]));
    }

    #[test]
    fn oversized_payload_is_refused() {
        assert!(encode_config_copy(1, &vec![0; CONFIG_PAYLOAD_MAX + 1]).is_err());
        assert!(encode_config_copy(1, &vec![0; CONFIG_PAYLOAD_MAX]).is_ok());
    }
}
