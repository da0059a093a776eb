//! Configuration bundles: a device description and its namespaces' data keys (wrapped under
//! the device key), with a generation number, signed with the provisioning key.
//!
//! [`build`] makes one (keelctl); [`verify_and_open`] checks and opens one (the device). The
//! byte layout is in the crate documentation.

use crate::keys::{DataKey, DeviceKey};
use crate::model::{self, Device, ValidationError};
use alloc::vec::Vec;
use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Magic at offset 0 of a bundle.
pub const BUNDLE_MAGIC: [u8; 8] = *b"KEELBNDL";
/// The bundle format this crate writes and reads.
pub const BUNDLE_VERSION: u16 = 1;
/// Bytes of the bundle header.
pub const BUNDLE_HEADER_LEN: usize = 32;
/// Bytes of the Ed25519 signature that ends a bundle.
pub const SIGNATURE_LEN: usize = 64;
/// Largest bundle: what one configuration copy holds.
pub const MAX_BUNDLE_LEN: usize = crate::flash::CONFIG_PAYLOAD_MAX;
/// Bytes of a wrapped key's XChaCha20-Poly1305 nonce.
pub const WRAP_NONCE_LEN: usize = 24;
/// Domain separation of the key-wrapping key derived from the device key.
const WRAP_KEY_LABEL: &[u8] = b"keel/v1/bundle-key-wrap";
/// Domain separation of a wrapped key's associated data.
const WRAP_AAD_LABEL: &[u8] = b"keel/v1/data-key";

/// The signed, postcard-encoded body of a bundle.
#[derive(Serialize, Deserialize)]
struct Body {
    device: Device,
    keys: Vec<WrappedKey>,
}

/// A namespace data key sealed under the device's wrapping key.
#[derive(Serialize, Deserialize)]
struct WrappedKey {
    /// Index of the namespace in `device.namespaces`.
    namespace: u16,
    nonce: [u8; WRAP_NONCE_LEN],
    /// Ciphertext and 16-byte tag.
    sealed: Vec<u8>,
}

/// What a bundle's header says (read without checking anything else: [`inspect`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleHeader {
    /// Format version.
    pub version: u16,
    /// Generation number.
    pub generation: u64,
    /// Length of the postcard body.
    pub body_len: usize,
}

impl BundleHeader {
    /// Total length of the bundle.
    pub fn total_len(&self) -> usize {
        BUNDLE_HEADER_LEN + self.body_len + SIGNATURE_LEN
    }
}

/// An opened, verified bundle.
#[derive(Debug, Clone)]
pub struct Config {
    /// Its generation number.
    pub generation: u64,
    /// The device description (validated).
    pub device: Device,
    /// The data key of each namespace, in the order of `device.namespaces`: `Some` exactly for
    /// the encrypted ones, of the cipher's key length.
    pub keys: Vec<Option<DataKey>>,
}

/// Why a bundle is refused (or cannot be built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleError {
    /// Shorter than its header says.
    Truncated {
        /// Its length.
        len: usize,
        /// The length it needs.
        needed: usize,
    },
    /// Longer than its header says.
    TrailingData {
        /// Its length.
        len: usize,
        /// The length its header gives.
        expected: usize,
    },
    /// Not a bundle.
    BadMagic,
    /// A format version this firmware does not read.
    UnsupportedVersion(u16),
    /// Larger than a configuration copy.
    TooLarge(usize),
    /// The signature is missing (all zeroes).
    Unsigned,
    /// The signature does not verify against the trusted provisioning key: tampered with, or
    /// signed with another key.
    BadSignature,
    /// Not newer than the configuration in force.
    Rollback {
        /// The bundle's generation.
        generation: u64,
        /// The generation in force.
        current: u64,
    },
    /// Signed, but its body does not decode.
    Malformed(&'static str),
    /// Signed, but its description breaks a rule.
    Invalid(ValidationError),
    /// A data key does not unwrap under this device's key (a bundle for another device).
    KeyUnwrap {
        /// Index of the namespace.
        namespace: usize,
    },
}

impl fmt::Display for BundleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BundleError::Truncated { len, needed } => {
                write!(f, "truncated bundle: {len} bytes, {needed} needed")
            }
            BundleError::TrailingData { len, expected } => {
                write!(f, "bundle of {len} bytes, its header says {expected}")
            }
            BundleError::BadMagic => f.write_str("not a Keel configuration bundle (bad magic)"),
            BundleError::UnsupportedVersion(v) => write!(
                f,
                "bundle format version {v} is not supported (this build reads {BUNDLE_VERSION})"
            ),
            BundleError::TooLarge(n) => write!(
                f,
                "bundle of {n} bytes exceeds the {MAX_BUNDLE_LEN}-byte configuration area"
            ),
            BundleError::Unsigned => f.write_str("bundle is not signed"),
            BundleError::BadSignature => f.write_str(
                "bundle signature does not verify against the trusted provisioning key (tampered, or signed with another key)",
            ),
            BundleError::Rollback {
                generation,
                current,
            } => write!(
                f,
                "bundle generation {generation} is not newer than generation {current} in force (rollback refused)"
            ),
            BundleError::Malformed(what) => write!(f, "malformed bundle: {what}"),
            BundleError::Invalid(e) => write!(f, "invalid device description: {e}"),
            BundleError::KeyUnwrap { namespace } => write!(
                f,
                "the data key of namespace[{namespace}] does not unwrap under this device's key (bundle made for another device?)"
            ),
        }
    }
}

impl core::error::Error for BundleError {}

/// The key-wrapping key: SHA-256 over a label and the device key, so the device key itself
/// is never an AEAD key and can serve other purposes under other labels.
fn wrap_cipher(device_key: &DeviceKey) -> XChaCha20Poly1305 {
    let mut h = Sha256::new();
    h.update(WRAP_KEY_LABEL);
    h.update(device_key.expose_secret());
    let k = Zeroizing::new(<[u8; 32]>::from(h.finalize()));
    XChaCha20Poly1305::new((&*k).into())
}

/// Associated data of a wrapped key: binds it to the bundle generation, the namespace's place,
/// identity and cipher, so a key cannot be moved to another namespace or bundle.
fn wrap_aad(generation: u64, index: u16, ns: &model::Namespace) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + ns.subsystem.len());
    aad.extend_from_slice(WRAP_AAD_LABEL);
    aad.extend_from_slice(&generation.to_le_bytes());
    aad.extend_from_slice(&index.to_le_bytes());
    aad.extend_from_slice(&ns.nsid.to_le_bytes());
    aad.push(ns.encryption.key_len() as u8);
    aad.extend_from_slice(ns.subsystem.as_bytes());
    aad
}

fn header(generation: u64, body_len: usize) -> [u8; BUNDLE_HEADER_LEN] {
    let mut h = [0u8; BUNDLE_HEADER_LEN];
    h[..8].copy_from_slice(&BUNDLE_MAGIC);
    h[8..10].copy_from_slice(&BUNDLE_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&(BUNDLE_HEADER_LEN as u16).to_le_bytes());
    // 12..16: flags, zero.
    h[16..24].copy_from_slice(&generation.to_le_bytes());
    h[24..28].copy_from_slice(&(body_len as u32).to_le_bytes());
    // 28..32: reserved, zero.
    h
}

/// Makes fresh data keys for the encrypted namespaces of `device` from `rng` (an XTS key
/// with equal halves, which the cipher refuses, is drawn again).
fn fresh_keys(device: &Device, rng: &mut dyn FnMut(&mut [u8])) -> Vec<Option<DataKey>> {
    device
        .namespaces
        .iter()
        .map(|ns| {
            let n = ns.encryption.key_len();
            (n > 0).then(|| {
                loop {
                    let mut k = Zeroizing::new(alloc::vec![0u8; n]);
                    rng(&mut k);
                    if k[..n / 2] != k[n / 2..] {
                        break DataKey::from_bytes(core::mem::take(&mut *k));
                    }
                }
            })
        })
        .collect()
}

/// Builds a bundle: validates `device`, draws a data key for each encrypted namespace, wraps
/// each under `device_key` (XChaCha20-Poly1305, random 24-byte nonce), encodes the body with
/// postcard and signs header and body with `signing_key`. `rng` fills buffers with
/// cryptographically secure random bytes (the OS generator on the host).
pub fn build(
    device: &Device,
    generation: u64,
    signing_key: &SigningKey,
    device_key: &DeviceKey,
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<Vec<u8>, BundleError> {
    let keys = fresh_keys(device, rng);
    build_with_keys(device, generation, signing_key, device_key, &keys, rng)
}

/// [`build`] with given data keys (one entry per namespace, `Some` exactly for the
/// encrypted ones): to re-sign a configuration without changing its keys.
pub fn build_with_keys(
    device: &Device,
    generation: u64,
    signing_key: &SigningKey,
    device_key: &DeviceKey,
    keys: &[Option<DataKey>],
    rng: &mut dyn FnMut(&mut [u8]),
) -> Result<Vec<u8>, BundleError> {
    model::validate(device).map_err(BundleError::Invalid)?;
    if generation == 0 {
        return Err(BundleError::Malformed(
            "generation 0 is reserved for 'never provisioned'",
        ));
    }
    if keys.len() != device.namespaces.len() {
        return Err(BundleError::Malformed(
            "one key entry per namespace is needed",
        ));
    }
    let cipher = wrap_cipher(device_key);
    let mut wrapped = Vec::new();
    for (i, (ns, key)) in device.namespaces.iter().zip(keys).enumerate() {
        let want = ns.encryption.key_len();
        match key {
            None if want == 0 => {}
            Some(k) if k.len() == want => {
                let index = i as u16;
                let mut nonce = [0u8; WRAP_NONCE_LEN];
                rng(&mut nonce);
                let aad = wrap_aad(generation, index, ns);
                let sealed = cipher
                    .encrypt(
                        &XNonce::from(nonce),
                        AeadPayload {
                            msg: k.expose_secret(),
                            aad: &aad,
                        },
                    )
                    .map_err(|_| BundleError::Malformed("key wrapping failed"))?;
                wrapped.push(WrappedKey {
                    namespace: index,
                    nonce,
                    sealed,
                });
            }
            _ => {
                return Err(BundleError::Malformed(
                    "a data key does not match its namespace's cipher",
                ));
            }
        }
    }
    let mut body = postcard::to_allocvec(&Body {
        device: device.clone(),
        keys: wrapped,
    })
    .map_err(|_| BundleError::Malformed("encoding the body failed"))?;
    // QoS travels after the body of the first format (see `open_body`); none: nothing. The
    // drive cap follows in a section of its own, only when set.
    // The NGUID section needs the QoS section in front of it (empty or not), so that the
    // sections keep their order.
    if !device.qos.is_empty() || !device.nguids.is_empty() {
        let qos = postcard::to_allocvec(&device.qos)
            .map_err(|_| BundleError::Malformed("encoding the QoS section failed"))?;
        body.extend_from_slice(&qos);
    }
    if let Some(n) = device.qos.drive_max_inflight {
        let s = postcard::to_allocvec(&QosSettings {
            tag: QOS_SETTINGS_TAG,
            drive_max_inflight: n,
        })
        .map_err(|_| BundleError::Malformed("encoding the QoS settings failed"))?;
        body.extend_from_slice(&s);
    }
    if !device.nguids.is_empty() {
        let s = postcard::to_allocvec(&NguidSection {
            tag: NGUID_TAG,
            nguids: device.nguids.clone(),
        })
        .map_err(|_| BundleError::Malformed("encoding the NGUID section failed"))?;
        body.extend_from_slice(&s);
    }
    let total = BUNDLE_HEADER_LEN + body.len() + SIGNATURE_LEN;
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge(total));
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header(generation, body.len()));
    out.extend_from_slice(&body);
    let sig = signing_key.sign(&out);
    out.extend_from_slice(&sig.to_bytes());
    Ok(out)
}

/// The QoS section's sequel: settings added after the QoS section's format was fixed.
#[derive(Serialize, Deserialize)]
struct QosSettings {
    /// [`QOS_SETTINGS_TAG`]: stray bytes after the QoS section are not taken for settings.
    tag: [u8; 4],
    drive_max_inflight: u32,
}

const QOS_SETTINGS_TAG: [u8; 4] = *b"QoS1";

/// The NGUIDs of namespaces (by index), after the QoS sections.
#[derive(Serialize, Deserialize)]
struct NguidSection {
    /// [`NGUID_TAG`].
    tag: [u8; 4],
    nguids: Vec<(u16, [u8; 16])>,
}

const NGUID_TAG: [u8; 4] = *b"NGU1";

/// Decodes a body: the description and wrapped keys, then the optional QoS section that
/// later bundles append (absent in bundles made before QoS existed: no limits), then the
/// optional tagged sections in their order: QoS settings (`QoS1`, absent before
/// `drive_max_inflight` existed: the default) and NGUIDs (`NGU1`, absent before namespaces
/// carried them: derived NGUIDs).
fn open_body(bytes: &[u8]) -> Result<Body, BundleError> {
    let (mut body, rest) = postcard::take_from_bytes::<Body>(bytes)
        .map_err(|_| BundleError::Malformed("the body does not decode"))?;
    if rest.is_empty() {
        return Ok(body);
    }
    let mut rest = match postcard::take_from_bytes::<crate::qos::Qos>(rest) {
        Ok((q, rest)) => {
            body.device.qos = q;
            rest
        }
        Err(_) => return Err(BundleError::Malformed("the QoS section does not decode")),
    };
    if rest.starts_with(&QOS_SETTINGS_TAG) {
        let (s, r) = postcard::take_from_bytes::<QosSettings>(rest)
            .map_err(|_| BundleError::Malformed("the QoS settings section does not decode"))?;
        body.device.qos.drive_max_inflight = Some(s.drive_max_inflight);
        rest = r;
    }
    if rest.starts_with(&NGUID_TAG) {
        let (s, r) = postcard::take_from_bytes::<NguidSection>(rest)
            .map_err(|_| BundleError::Malformed("the NGUID section does not decode"))?;
        body.device.nguids = s.nguids;
        rest = r;
    }
    if !rest.is_empty() {
        return Err(BundleError::Malformed(
            "bytes after the last section (QoS, QoS settings, NGUIDs)",
        ));
    }
    Ok(body)
}

/// Reads a bundle's header and checks its framing (magic, version, length), nothing else.
pub fn inspect(bytes: &[u8]) -> Result<BundleHeader, BundleError> {
    if bytes.len() >= 8 && bytes[..8] != BUNDLE_MAGIC {
        return Err(BundleError::BadMagic);
    }
    let h = bytes
        .get(..BUNDLE_HEADER_LEN)
        .ok_or(BundleError::Truncated {
            len: bytes.len(),
            needed: BUNDLE_HEADER_LEN + SIGNATURE_LEN,
        })?;
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != BUNDLE_VERSION {
        return Err(BundleError::UnsupportedVersion(version));
    }
    if usize::from(u16::from_le_bytes([h[10], h[11]])) != BUNDLE_HEADER_LEN
        || h[12..16] != [0; 4]
        || h[28..32] != [0; 4]
    {
        return Err(BundleError::Malformed(
            "header length, flags or reserved bytes",
        ));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&h[16..24]);
    let body_len = u32::from_le_bytes([h[24], h[25], h[26], h[27]]) as usize;
    let hdr = BundleHeader {
        version,
        generation: u64::from_le_bytes(g),
        body_len,
    };
    let total = hdr.total_len();
    if total > MAX_BUNDLE_LEN {
        return Err(BundleError::TooLarge(total));
    }
    if bytes.len() < total {
        return Err(BundleError::Truncated {
            len: bytes.len(),
            needed: total,
        });
    }
    if bytes.len() > total {
        return Err(BundleError::TrailingData {
            len: bytes.len(),
            expected: total,
        });
    }
    Ok(hdr)
}

/// Checks the signature of a bundle against the trusted provisioning key (strict Ed25519:
/// no malleable or small-order signatures), returning its header.
pub fn verify_signature(bytes: &[u8], trusted: &VerifyingKey) -> Result<BundleHeader, BundleError> {
    let hdr = inspect(bytes)?;
    let (signed, sig) = bytes.split_at(BUNDLE_HEADER_LEN + hdr.body_len);
    if sig.iter().all(|&b| b == 0) {
        return Err(BundleError::Unsigned);
    }
    let sig = Signature::from_slice(sig).map_err(|_| BundleError::BadSignature)?;
    trusted
        .verify_strict(signed, &sig)
        .map_err(|_| BundleError::BadSignature)?;
    Ok(hdr)
}

/// Verifies and opens a bundle: framing, signature against `trusted` (the provisioning public
/// key the device trusts), generation strictly above `current_generation` (0 on a device never
/// provisioned), body decoding, description rules, and unwrapping of every data key under
/// `device_key`. Nothing is returned unless all of it holds.
pub fn verify_and_open(
    bytes: &[u8],
    trusted: &VerifyingKey,
    device_key: &DeviceKey,
    current_generation: u64,
) -> Result<Config, BundleError> {
    let hdr = verify_signature(bytes, trusted)?;
    if hdr.generation <= current_generation {
        return Err(BundleError::Rollback {
            generation: hdr.generation,
            current: current_generation,
        });
    }
    let body_bytes = &bytes[BUNDLE_HEADER_LEN..BUNDLE_HEADER_LEN + hdr.body_len];
    let body = open_body(body_bytes)?;
    model::validate(&body.device).map_err(BundleError::Invalid)?;
    let cipher = wrap_cipher(device_key);
    let mut keys: Vec<Option<DataKey>> = body.device.namespaces.iter().map(|_| None).collect();
    for w in &body.keys {
        let i = usize::from(w.namespace);
        let ns = body
            .device
            .namespaces
            .get(i)
            .ok_or(BundleError::Malformed("a wrapped key names no namespace"))?;
        if keys[i].is_some() {
            return Err(BundleError::Malformed("two keys for one namespace"));
        }
        let aad = wrap_aad(hdr.generation, w.namespace, ns);
        let plain = cipher
            .decrypt(
                &XNonce::from(w.nonce),
                AeadPayload {
                    msg: &w.sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| BundleError::KeyUnwrap { namespace: i })?;
        let key = DataKey::from_bytes(plain);
        if key.len() != ns.encryption.key_len() {
            return Err(BundleError::Malformed(
                "a data key's length does not match its cipher",
            ));
        }
        keys[i] = Some(key);
    }
    for (ns, k) in body.device.namespaces.iter().zip(&keys) {
        if (ns.encryption.key_len() > 0) != k.is_some() {
            return Err(BundleError::Malformed(
                "an encrypted namespace has no data key",
            ));
        }
    }
    Ok(Config {
        generation: hdr.generation,
        device: body.device,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, Encryption, Management, Namespace, Network, Subsystem};
    use crate::qos::{NamespaceQos, Qos, QosGroup, QosLimits, QosRate};
    use alloc::vec;

    const NQN: &str = "nqn.2026-11.dev.keel:vol0";

    /// The description as bundles encoded it before QoS existed (its fields, in order).
    #[derive(Serialize)]
    struct DeviceBeforeQos {
        network: Network,
        subsystems: Vec<Subsystem>,
        namespaces: Vec<Namespace>,
        management: Option<Management>,
    }

    #[derive(Serialize)]
    struct BodyBeforeQos {
        device: DeviceBeforeQos,
        keys: Vec<WrappedKey>,
    }

    fn device() -> Device {
        Device {
            network: Network::Dhcp,
            subsystems: vec![Subsystem {
                nqn: NQN.into(),
                serial: None,
                model: None,
                allowed_hosts: vec![],
            }],
            namespaces: (1..=2)
                .map(|nsid| Namespace {
                    subsystem: NQN.into(),
                    nsid,
                    backend: Backend::Ram {
                        size: 1 << 20,
                        block_size: 512,
                    },
                    encryption: Encryption::None,
                    function: None,
                })
                .collect(),
            management: None,
            qos: Qos::default(),
            nguids: Vec::new(),
        }
    }

    fn keys() -> (SigningKey, DeviceKey) {
        (
            SigningKey::from_bytes(&[7; 32]),
            DeviceKey::from_bytes([8; 32]),
        )
    }

    fn sign(body: &[u8], generation: u64, sk: &SigningKey) -> Vec<u8> {
        let mut out = header(generation, body.len()).to_vec();
        out.extend_from_slice(body);
        let sig = sk.sign(&out);
        out.extend_from_slice(&sig.to_bytes());
        out
    }

    #[test]
    fn a_bundle_from_before_qos_still_opens_without_limits() {
        let (sk, dk) = keys();
        let d = device();
        let body = postcard::to_allocvec(&BodyBeforeQos {
            device: DeviceBeforeQos {
                network: d.network.clone(),
                subsystems: d.subsystems.clone(),
                namespaces: d.namespaces.clone(),
                management: None,
            },
            keys: vec![],
        })
        .unwrap();
        let c = verify_and_open(&sign(&body, 3, &sk), &sk.verifying_key(), &dk, 0).unwrap();
        assert_eq!(c.device, d);
        assert!(c.device.qos.is_empty());
        // A description without QoS encodes exactly as before.
        let b = build(&d, 3, &sk, &dk, &mut |b| b.fill(1)).unwrap();
        assert_eq!(&b[BUNDLE_HEADER_LEN..b.len() - SIGNATURE_LEN], &body[..]);
    }

    #[test]
    fn qos_travels_in_the_trailing_section() {
        let (sk, dk) = keys();
        let mut d = device();
        let rate = |per_sec| {
            Some(QosRate {
                per_sec,
                burst: Some(8),
            })
        };
        d.qos = Qos {
            namespaces: vec![NamespaceQos {
                subsystem: NQN.into(),
                nsid: 2,
                limits: QosLimits {
                    write_iops: rate(500),
                    ..Default::default()
                },
                weight: 3,
                group: Some("b".into()),
            }],
            groups: vec![QosGroup {
                name: "b".into(),
                limits: QosLimits {
                    bps: rate(1 << 20),
                    ..Default::default()
                },
                weight: 0,
            }],
            ..Default::default()
        };
        // The drive cap travels in its own section after the QoS section (also without any
        // other QoS). Garbage after the last section (signed, so only a bad builder makes it)
        // is refused.
        let capped = |qos: &Qos| Qos {
            drive_max_inflight: Some(16),
            ..qos.clone()
        };
        let garbage = "bytes after the last section (QoS, QoS settings, NGUIDs)";
        for qos in [d.qos.clone(), capped(&d.qos), capped(&Qos::default())] {
            let d = Device { qos, ..d.clone() };
            let b = build(&d, 4, &sk, &dk, &mut |b| b.fill(1)).unwrap();
            let c = verify_and_open(&b, &sk.verifying_key(), &dk, 0).unwrap();
            assert_eq!(c.device.qos, d.qos);
            let mut body = b[BUNDLE_HEADER_LEN..b.len() - SIGNATURE_LEN].to_vec();
            body.push(0);
            assert_eq!(
                verify_and_open(&sign(&body, 4, &sk), &sk.verifying_key(), &dk, 0).unwrap_err(),
                BundleError::Malformed(garbage)
            );
        }
        // A QoS section breaking a rule is refused as an invalid description.
        d.qos.namespaces[0].group = Some("nobody".into());
        assert!(matches!(
            build(&d, 5, &sk, &dk, &mut |b| b.fill(1)),
            Err(BundleError::Invalid(e)) if e.path == "namespace[1].qos.group"
        ));
    }
}
