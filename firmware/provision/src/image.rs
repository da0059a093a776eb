//! The signed firmware image header: one per slot, in the slot's last sector (see the crate
//! documentation for the byte map).

use alloc::string::String;
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Magic at offset 0 of an image header.
pub const IMAGE_MAGIC: [u8; 8] = *b"KEELIMG\0";
/// The header format this crate writes and reads.
pub const IMAGE_HEADER_VERSION: u16 = 1;
/// Bytes of an image header.
pub const IMAGE_HEADER_LEN: usize = 512;
/// Bytes covered by the signature (everything before it).
pub const IMAGE_SIGNED_LEN: usize = 448;
/// Bytes of each text field (version, build id, board), NUL padded.
pub const TEXT_FIELD_LEN: usize = 32;

/// A firmware image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// Firmware version (`0.1.0`).
    pub firmware_version: String,
    /// Build identifier (a git revision or a digest).
    pub build_id: String,
    /// The board the image is built for (`qemu-virt`).
    pub board: String,
    /// Where the image runs (its link address).
    pub load_address: u64,
    /// Offset of the payload from the slot base (0 today). Relative, so one signed header
    /// is valid in either slot.
    pub payload_offset: u64,
    /// Bytes of payload (the raw image).
    pub payload_size: u64,
    /// RAM the image needs (the arm64 header's image_size).
    pub memory_size: u64,
    /// SHA-256 of the payload.
    pub sha256: [u8; 32],
    /// The signer's Ed25519 public key.
    pub signer: [u8; 32],
    /// Ed25519 signature over the first [`IMAGE_SIGNED_LEN`] bytes of the header.
    pub signature: [u8; 64],
}

/// Why an image header or image is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// Fewer than [`IMAGE_HEADER_LEN`] bytes.
    Truncated,
    /// No image header here.
    BadMagic,
    /// A header version this build does not read.
    UnsupportedVersion(u16),
    /// A field is out of range.
    Malformed(&'static str),
    /// A text field is longer than 31 bytes.
    FieldTooLong(&'static str),
    /// The payload's SHA-256 differs from the header's.
    PayloadHash,
    /// The signature does not verify against the signer key in the header.
    BadSignature,
    /// Signed by a key other than the trusted one.
    UntrustedSigner,
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Truncated => f.write_str("truncated image header"),
            ImageError::BadMagic => f.write_str("no Keel image header (bad magic)"),
            ImageError::UnsupportedVersion(v) => {
                write!(f, "image header version {v} is not supported")
            }
            ImageError::Malformed(w) => write!(f, "malformed image header: {w}"),
            ImageError::FieldTooLong(w) => {
                write!(f, "{w} is longer than {} bytes", TEXT_FIELD_LEN - 1)
            }
            ImageError::PayloadHash => f.write_str("image payload does not match its SHA-256"),
            ImageError::BadSignature => f.write_str("image signature does not verify"),
            ImageError::UntrustedSigner => f.write_str("image signed by an untrusted key"),
        }
    }
}

impl core::error::Error for ImageError {}

fn put_text(out: &mut [u8], s: &str, what: &'static str) -> Result<(), ImageError> {
    if s.len() >= TEXT_FIELD_LEN || s.bytes().any(|b| b == 0) {
        return Err(ImageError::FieldTooLong(what));
    }
    out[..s.len()].copy_from_slice(s.as_bytes());
    Ok(())
}

fn get_text(b: &[u8]) -> Result<String, ImageError> {
    let n = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(ImageError::Malformed("text field not terminated"))?;
    if b[n..].iter().any(|&c| c != 0) {
        return Err(ImageError::Malformed("text field padding"));
    }
    core::str::from_utf8(&b[..n])
        .map(String::from)
        .map_err(|_| ImageError::Malformed("text field not UTF-8"))
}

impl ImageHeader {
    /// Encodes the header (the signature as it stands).
    pub fn to_bytes(&self) -> Result<[u8; IMAGE_HEADER_LEN], ImageError> {
        let mut h = [0u8; IMAGE_HEADER_LEN];
        h[..8].copy_from_slice(&IMAGE_MAGIC);
        h[8..10].copy_from_slice(&IMAGE_HEADER_VERSION.to_le_bytes());
        h[10..12].copy_from_slice(&(IMAGE_HEADER_LEN as u16).to_le_bytes());
        // 12..16: flags, zero.
        put_text(&mut h[16..48], &self.firmware_version, "firmware version")?;
        put_text(&mut h[48..80], &self.build_id, "build id")?;
        put_text(&mut h[80..112], &self.board, "board name")?;
        h[112..120].copy_from_slice(&self.load_address.to_le_bytes());
        h[120..128].copy_from_slice(&self.payload_offset.to_le_bytes());
        h[128..136].copy_from_slice(&self.payload_size.to_le_bytes());
        h[136..144].copy_from_slice(&self.memory_size.to_le_bytes());
        h[144..176].copy_from_slice(&self.sha256);
        h[176..208].copy_from_slice(&self.signer);
        // 208..448: reserved, zero (signed).
        h[448..512].copy_from_slice(&self.signature);
        Ok(h)
    }

    /// Decodes a header (nothing verified beyond its framing).
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        if bytes.len() >= 8 && bytes[..8] != IMAGE_MAGIC {
            return Err(ImageError::BadMagic);
        }
        let h = bytes.get(..IMAGE_HEADER_LEN).ok_or(ImageError::Truncated)?;
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != IMAGE_HEADER_VERSION {
            return Err(ImageError::UnsupportedVersion(version));
        }
        if usize::from(u16::from_le_bytes([h[10], h[11]])) != IMAGE_HEADER_LEN
            || h[12..16] != [0; 4]
            || h[208..448].iter().any(|&b| b != 0)
        {
            return Err(ImageError::Malformed(
                "header length, flags or reserved bytes",
            ));
        }
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&h[144..176]);
        let mut signer = [0u8; 32];
        signer.copy_from_slice(&h[176..208]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&h[448..512]);
        Ok(ImageHeader {
            firmware_version: get_text(&h[16..48])?,
            build_id: get_text(&h[48..80])?,
            board: get_text(&h[80..112])?,
            load_address: u64_at(112),
            payload_offset: u64_at(120),
            payload_size: u64_at(128),
            memory_size: u64_at(136),
            sha256,
            signer,
            signature,
        })
    }

    /// Sets the payload's size and SHA-256.
    pub fn set_payload(&mut self, payload: &[u8]) {
        self.payload_size = payload.len() as u64;
        self.sha256 = Sha256::digest(payload).into();
    }

    /// Signs the header with `key` (recording its public key as the signer).
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), ImageError> {
        self.signer = key.verifying_key().to_bytes();
        let bytes = self.to_bytes()?;
        self.signature = key.sign(&bytes[..IMAGE_SIGNED_LEN]).to_bytes();
        Ok(())
    }

    /// Checks the signature against the signer key in the header and, when given, that this
    /// key is `trusted`; then that `payload` (exactly `payload_size` bytes) matches the
    /// SHA-256. Without `trusted` this proves integrity, not origin.
    pub fn verify(&self, payload: &[u8], trusted: Option<&VerifyingKey>) -> Result<(), ImageError> {
        let signer =
            VerifyingKey::from_bytes(&self.signer).map_err(|_| ImageError::BadSignature)?;
        if let Some(t) = trusted
            && t.to_bytes() != self.signer
        {
            return Err(ImageError::UntrustedSigner);
        }
        let bytes = self.to_bytes()?;
        signer
            .verify_strict(
                &bytes[..IMAGE_SIGNED_LEN],
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| ImageError::BadSignature)?;
        if payload.len() as u64 != self.payload_size {
            return Err(ImageError::Malformed(
                "payload length differs from the header's size",
            ));
        }
        let digest: [u8; 32] = Sha256::digest(payload).into();
        if digest != self.sha256 {
            return Err(ImageError::PayloadHash);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn header() -> ImageHeader {
        ImageHeader {
            firmware_version: "0.1.0".into(),
            build_id: "1a2b3c4d5e6f".into(),
            board: "qemu-virt".into(),
            load_address: 0x4020_0000,
            payload_offset: 0,
            payload_size: 0,
            memory_size: 0x10_0000,
            sha256: [0; 32],
            signer: [0; 32],
            signature: [0; 64],
        }
    }

    #[test]
    fn round_trip_sign_verify_and_tamper() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let payload = [0x11u8; 1000];
        let mut h = header();
        h.set_payload(&payload);
        h.sign(&key).unwrap();
        let bytes = h.to_bytes().unwrap();
        let back = ImageHeader::parse(&bytes).unwrap();
        assert_eq!(back, h);
        back.verify(&payload, Some(&key.verifying_key())).unwrap();
        back.verify(&payload, None).unwrap();
        assert_eq!(
            back.verify(&payload, Some(&other.verifying_key())),
            Err(ImageError::UntrustedSigner)
        );
        let mut bad = payload;
        bad[3] ^= 1;
        assert_eq!(back.verify(&bad, None), Err(ImageError::PayloadHash));
        for bit in [8 * 20, 8 * 85, 8 * 115, 8 * 150, 8 * 300, 8 * 460] {
            let mut t = bytes;
            t[bit / 8] ^= 1 << (bit % 8);
            let ok =
                ImageHeader::parse(&t).and_then(|h| h.verify(&payload, Some(&key.verifying_key())));
            assert!(ok.is_err(), "flip at byte {}", bit / 8);
        }
    }

    #[test]
    fn text_fields_are_bounded() {
        let mut h = header();
        h.board = "x".repeat(32);
        assert_eq!(h.to_bytes(), Err(ImageError::FieldTooLong("board name")));
        h.board = "x".repeat(31);
        assert!(h.to_bytes().is_ok());
        assert_eq!(ImageHeader::parse(&[0xff; 512]), Err(ImageError::BadMagic));
        assert_eq!(ImageHeader::parse(&IMAGE_MAGIC), Err(ImageError::Truncated));
        assert!(ImageError::BadMagic.to_string().contains("magic"));
    }
}
