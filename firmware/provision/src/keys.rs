//! Secret key types: zeroed when dropped, never printed by `Debug`.

use alloc::vec::Vec;
use core::fmt;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The 32-byte symmetric device key: shared by keelctl (which wraps namespace data keys under
/// it) and one device (which unwraps them), set at provisioning time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DeviceKey([u8; 32]);

impl DeviceKey {
    /// Length in bytes.
    pub const LEN: usize = 32;

    /// A device key from its bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DeviceKey(bytes)
    }

    /// The key's bytes (to store it; never log them).
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// A namespace data key (an AES-XTS key pair, 32 or 64 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(Zeroizing<Vec<u8>>);

impl DataKey {
    /// A data key from its bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        DataKey(Zeroizing::new(bytes))
    }

    /// The key's bytes (to hand to the cipher; never log them).
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty (never, for a key from a bundle).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DataKey(<redacted, {} bytes>)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    #[test]
    fn keys_never_print() {
        let d = DeviceKey::from_bytes([0xab; 32]);
        let k = DataKey::from_bytes(vec![0xcd; 64]);
        let s = format!("{d:?} {k:?}");
        assert!(
            !s.contains("ab") && !s.contains("171") && !s.contains("cd") && !s.contains("205"),
            "{s}"
        );
    }
}
