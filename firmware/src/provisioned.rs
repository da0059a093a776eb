//! The provisioned configuration: trust anchor, device key, and the configuration copies in
//! flash.
//!
//! # Trust anchor: built in, not pinned on first use
//!
//! The provisioning public key that bundles must be signed with is built into the image
//! (`firmware/build.rs`, `KEEL_PROVISION_PUBKEY=KEY.pub`, by default the public development
//! key of `qemu/dev-keys`). The image itself is signed by the same key chain (`keelctl image
//! pack`), so the anchor cannot be replaced by writing the configuration area, and a device
//! is never "unowned": the alternative, pinning the first key that provisions a blank device
//! (trust on first use), lets whoever reaches a blank device first own it, and makes a
//! pinned key that leaks unrecoverable without a factory reset that itself needs protecting.
//! The price of a built-in key: rotating it needs a firmware update, and a firmware built
//! with the development key trusts bundles anyone can sign; the banner says so loudly.
//!
//! # Device key
//!
//! A secret unique to the device that unwraps namespace data keys. On QEMU it is read from
//! the identity block at the start of pflash bank 1 ([`keel_provision::identity`]); on a real
//! DPU it would come from OTP/eFuses or a secure element, out of reach of software that can
//! read the flash.
//!
//! # Reading the flash
//!
//! Both banks stay mapped as Device memory (the CFI command sequences need ordered,
//! unmerged accesses, and the same mapping serves reading and writing); Device memory faults
//! on unaligned accesses, so the copies are read with aligned 32-bit volatile loads
//! (`keel_hal::flash::CfiFlash::read`, behind [`crate::hw::Flash`]) into a heap buffer: the header first, then exactly
//! the payload it announces (at most 1 MiB), once at boot.

use crate::hw::Flash;
use crate::klog;
use crate::plan::Source;
use alloc::{format, string::String, vec, vec::Vec};
use keel_provision::{
    BundleError, Config, ConfigCopy, DeviceKey,
    ed25519_dalek::VerifyingKey,
    flash::{CONFIG_COPY_SIZE, CONFIG_HEADER_LEN, CONFIG_PAYLOAD_MAX},
};
use sha2::{Digest, Sha256};

include!(concat!(env!("OUT_DIR"), "/trust_anchor.rs"));

/// The device's keys and its flash.
pub struct Identity<F: Flash> {
    /// The built-in provisioning public key.
    pub trusted: Option<VerifyingKey>,
    /// Its bytes.
    pub pubkey: [u8; 32],
    /// The device key, if the identity block holds one.
    pub device_key: Option<DeviceKey>,
    /// Flash bank 0 (firmware slots and configuration copies).
    pub flash: Option<F>,
}

impl<F: Flash> core::fmt::Debug for Identity<F> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &fingerprint(&self.pubkey))
            .field("device_key", &self.device_key.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether the built-in trust anchor is the public development key (the banner warns).
pub fn is_development_key() -> bool {
    PROVISION_KEY_IS_DEV
}

/// The key's fingerprint: the first 8 bytes of SHA-256 of the public key, in hex, in groups.
pub fn fingerprint(key: &[u8; 32]) -> String {
    let h = Sha256::digest(key);
    let mut s = String::from("SHA256:");
    for (i, b) in h[..8].iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl<F: Flash> Identity<F> {
    /// The identity of a device: the built-in trust anchor, the device key (if the device
    /// has one) and the flash that holds the configuration copies (if any).
    pub fn new(device_key: Option<DeviceKey>, flash: Option<F>) -> Self {
        let trusted = VerifyingKey::from_bytes(&PROVISION_PUBKEY)
            .map_err(|_| {
                klog::error!("provision: the built-in provisioning key is not an Ed25519 key")
            })
            .ok();
        Identity {
            trusted,
            pubkey: PROVISION_PUBKEY,
            device_key,
            flash,
        }
    }

    /// The device key, or an all-zero stand-in that unwraps nothing (bundles without
    /// encrypted namespaces still open).
    pub fn device_key_or_none(&self) -> DeviceKey {
        self.device_key
            .clone()
            .unwrap_or_else(|| DeviceKey::from_bytes([0; 32]))
    }

    /// Reads configuration copy `copy` (header, then the payload it announces); `None` when
    /// there is no flash.
    pub fn read_copy(&mut self, copy: ConfigCopy) -> Result<Vec<u8>, F::Error> {
        let Some(flash) = self.flash.as_mut() else {
            return Ok(Vec::new());
        };
        let mut header = [0u8; CONFIG_HEADER_LEN];
        flash.read(copy.offset(), &mut header)?;
        let len = u32::from_le_bytes([header[16], header[17], header[18], header[19]]) as usize;
        if header[..4] != keel_provision::flash::CONFIG_MAGIC || len > CONFIG_PAYLOAD_MAX {
            return Ok(header.to_vec());
        }
        let mut region = vec![0u8; CONFIG_HEADER_LEN + len];
        flash.read(copy.offset(), &mut region)?;
        Ok(region)
    }

    /// Opens a bundle with the built-in key and the device key.
    pub fn open(&self, bundle: &[u8], floor: u64) -> Result<Config, BundleError> {
        let Some(trusted) = self.trusted.as_ref() else {
            return Err(BundleError::BadSignature);
        };
        keel_provision::verify_and_open(bundle, trusted, &self.device_key_or_none(), floor)
    }

    /// The configuration in force in flash: the newest valid copy whose bundle verifies and
    /// opens; a copy that fails is reported and the other one tried. `None`: no provisioned
    /// configuration.
    pub fn load_config(&mut self) -> Option<(Config, Source)> {
        if self.flash.is_none() {
            klog::info!("config: no flash bank 0");
            return None;
        }
        let a = self.read_copy(ConfigCopy::A);
        let b = self.read_copy(ConfigCopy::B);
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                klog::error!("config: reading the configuration area: {}", klog::D(&e));
                return None;
            }
        };
        let entries = [
            (ConfigCopy::A, keel_provision::flash::parse_config_copy(&a)),
            (ConfigCopy::B, keel_provision::flash::parse_config_copy(&b)),
        ];
        for (copy, raw) in [(ConfigCopy::A, &a), (ConfigCopy::B, &b)] {
            let erased = raw
                .iter()
                .take(CONFIG_HEADER_LEN)
                .all(|&x| x == 0xff || x == 0);
            if entries.iter().any(|(c, e)| *c == copy && e.is_none()) && !erased {
                klog::warning!(
                    "config: copy {} is damaged (bad magic, length or CRC): ignored",
                    copy.name()
                );
            }
        }
        let mut valid: Vec<_> = entries
            .iter()
            .filter_map(|(c, e)| e.map(|e| (*c, e)))
            .collect();
        // Newest first (copy A first on a tie, as chosen_config does).
        valid.sort_by_key(|(c, e)| (core::cmp::Reverse(e.sequence), *c == ConfigCopy::B));
        if let Some((chosen, _)) = keel_provision::flash::chosen_config(&a, &b) {
            debug_assert!(valid.first().is_some_and(|(c, _)| *c == chosen));
        }
        for (i, (copy, entry)) in valid.iter().enumerate() {
            match self.open(entry.payload, 0) {
                Ok(cfg) => {
                    klog::info!(
                        "config: copy {} (sequence {}, generation {}) in force{}",
                        copy.name(),
                        entry.sequence,
                        cfg.generation,
                        if i > 0 {
                            " (fallback: the newer copy was refused)"
                        } else {
                            ""
                        }
                    );
                    return Some((cfg, Source::Flash(copy.name(), entry.sequence)));
                }
                Err(e) => klog::error!(
                    "config: copy {} (sequence {}) refused: {}{}",
                    copy.name(),
                    entry.sequence,
                    klog::D(&e),
                    if i + 1 < valid.len() {
                        "; trying the other copy"
                    } else {
                        ""
                    }
                ),
            }
        }
        None
    }

    /// Writes `bundle` as the next configuration copy: the copy that is *not* in force, with
    /// the next sequence number ([`keel_provision::next_config_write`]), so a power cut in the
    /// middle leaves the copy in force intact. Returns the copy and sequence written.
    pub fn persist(&mut self, bundle: &[u8]) -> Result<(ConfigCopy, u64), String> {
        let a = self.read_copy(ConfigCopy::A).map_err(|e| format!("{e}"))?;
        let b = self.read_copy(ConfigCopy::B).map_err(|e| format!("{e}"))?;
        let w = keel_provision::next_config_write(&a, &b);
        let data = keel_provision::flash::encode_config_copy(w.sequence, bundle)
            .map_err(|e| format!("{e}"))?;
        let Some(flash) = self.flash.as_mut() else {
            return Err(String::from("no flash bank 0"));
        };
        let erase_len = data
            .len()
            .next_multiple_of(flash.sector_size())
            .min(CONFIG_COPY_SIZE);
        flash
            .erase(w.copy.offset(), erase_len)
            .map_err(|e| format!("{e}"))?;
        flash
            .program(w.copy.offset(), &data)
            .map_err(|e| format!("{e}"))?;
        Ok((w.copy, w.sequence))
    }
}
