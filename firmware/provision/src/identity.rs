//! The device identity block: where a device keeps its device key.
//!
//! On QEMU `virt` it is the first bytes of pflash bank 1 (`keelctl provision identity` writes
//! a bank image holding it); on a real DPU the device key would live in OTP fuses or a secure
//! element and never be readable by software that can also be replaced, which a flash bank
//! is not: anyone who can read the flash can read this key. That is the QEMU stand-in, not a
//! recommendation.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `KEELIDNT` |
//! | 8 | 2 | version (1) |
//! | 10 | 2 | block length (64) |
//! | 12 | 4 | reserved (0) |
//! | 16 | 32 | device key |
//! | 48 | 12 | reserved (0) |
//! | 60 | 4 | CRC32C (Castagnoli) over bytes 0..60 |

use crate::keys::DeviceKey;
use core::fmt;
use zeroize::Zeroize;

/// Magic of an identity block.
pub const IDENTITY_MAGIC: [u8; 8] = *b"KEELIDNT";
/// Format version.
pub const IDENTITY_VERSION: u16 = 1;
/// Length of the block.
pub const IDENTITY_LEN: usize = 64;

/// Why an identity block is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityError {
    /// Erased flash (all 0xFF) or too short: no identity was ever written.
    Empty,
    /// Not an identity block.
    BadMagic,
    /// A version this firmware does not read.
    UnsupportedVersion(u16),
    /// Length or reserved fields wrong.
    Malformed,
    /// The CRC does not match: damaged.
    BadCrc,
}

impl fmt::Display for IdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityError::Empty => f.write_str("no identity block (erased or empty flash)"),
            IdentityError::BadMagic => f.write_str("not an identity block (bad magic)"),
            IdentityError::UnsupportedVersion(v) => {
                write!(f, "identity block version {v} is not supported")
            }
            IdentityError::Malformed => {
                f.write_str("identity block length or reserved fields are wrong")
            }
            IdentityError::BadCrc => f.write_str("identity block CRC mismatch (damaged)"),
        }
    }
}

/// Encodes the identity block of `key`.
pub fn encode_identity(key: &DeviceKey) -> [u8; IDENTITY_LEN] {
    let mut b = [0u8; IDENTITY_LEN];
    b[..8].copy_from_slice(&IDENTITY_MAGIC);
    b[8..10].copy_from_slice(&IDENTITY_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(IDENTITY_LEN as u16).to_le_bytes());
    b[16..48].copy_from_slice(key.expose_secret());
    let crc = keel_crc32c::crc32c(&b[..60]);
    b[60..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Reads an identity block (or a longer region starting with one).
pub fn parse_identity(region: &[u8]) -> Result<DeviceKey, IdentityError> {
    let b = region.get(..IDENTITY_LEN).ok_or(IdentityError::Empty)?;
    if b.iter().all(|&x| x == 0xff) || b.iter().all(|&x| x == 0) {
        return Err(IdentityError::Empty);
    }
    if b[..8] != IDENTITY_MAGIC {
        return Err(IdentityError::BadMagic);
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != IDENTITY_VERSION {
        return Err(IdentityError::UnsupportedVersion(version));
    }
    if usize::from(u16::from_le_bytes([b[10], b[11]])) != IDENTITY_LEN
        || b[12..16] != [0; 4]
        || b[48..60] != [0; 12]
    {
        return Err(IdentityError::Malformed);
    }
    if keel_crc32c::crc32c(&b[..60]) != u32::from_le_bytes([b[60], b[61], b[62], b[63]]) {
        return Err(IdentityError::BadCrc);
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&b[16..48]);
    let key = DeviceKey::from_bytes(k);
    k.zeroize();
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let key = DeviceKey::from_bytes([7; 32]);
        let mut region = alloc::vec![0xffu8; 4096];
        region[..IDENTITY_LEN].copy_from_slice(&encode_identity(&key));
        assert_eq!(parse_identity(&region).unwrap().expose_secret(), &[7; 32]);
    }

    #[test]
    fn refusals() {
        let good = encode_identity(&DeviceKey::from_bytes([9; 32]));
        assert_eq!(
            parse_identity(&[0xff; 64]).unwrap_err(),
            IdentityError::Empty
        );
        assert_eq!(parse_identity(&[0; 64]).unwrap_err(), IdentityError::Empty);
        assert_eq!(
            parse_identity(&good[..63]).unwrap_err(),
            IdentityError::Empty
        );
        let mut b = good;
        b[0] = b'X';
        assert_eq!(parse_identity(&b).unwrap_err(), IdentityError::BadMagic);
        let mut b = good;
        b[8] = 2;
        assert_eq!(
            parse_identity(&b).unwrap_err(),
            IdentityError::UnsupportedVersion(2)
        );
        let mut b = good;
        b[50] = 1;
        assert_eq!(parse_identity(&b).unwrap_err(), IdentityError::Malformed);
        for i in 16..48 {
            let mut b = good;
            b[i] ^= 0x10;
            assert_eq!(
                parse_identity(&b).unwrap_err(),
                IdentityError::BadCrc,
                "byte {i}"
            );
        }
    }
}
