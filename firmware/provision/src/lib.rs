//! Provisioning for Keel: device descriptions, signed configuration bundles with wrapped data
//! keys, signed firmware image headers and the flash layout.
//!
//! Portable (`no_std` + `alloc`): the firmware verifies and opens bundles and reads the flash
//! layout with it; keelctl builds them. The feature `std` adds the TOML front end
//! ([`parse_toml`]).
//!
//! # Keys
//!
//! - **Provisioning key** (Ed25519, operator side, `keelctl keygen`): signs bundles and images.
//!   The device trusts one provisioning public key. The intended choice for the firmware is a
//!   key *built into the image* (the image itself is signed, so the trust anchor is covered by
//!   the same signature chain and cannot be swapped by writing the configuration area); the
//!   alternative, pinning the first key seen at first provisioning (trust on first use), lets
//!   whoever provisions an unprovisioned device first own it. Rotating a built-in key needs a
//!   firmware update.
//! - **Device key** (32 random bytes, one per device, shared by keelctl and the device at
//!   provisioning): wraps the namespace data keys so they never travel in clear. The wrapping
//!   cipher is XChaCha20-Poly1305 (24-byte random nonces: no nonce bookkeeping; constant-time in
//!   software, no AES hardware needed), keyed with `SHA-256("keel/v1/bundle-key-wrap" ‖ device
//!   key)`. The associated data binds each wrapped key to the bundle generation, the
//!   namespace's index, NSID, key length and subsystem NQN. A bundle opened with another
//!   device's key fails with [`BundleError::KeyUnwrap`]. Symmetric keys keep the device side
//!   small; the cost is that keelctl must hold every device's key (an asymmetric scheme,
//!   X25519 per device, would not: a later format version can add it).
//! - **Data keys** (AES-XTS, 32 or 64 bytes): drawn by keelctl when it builds a bundle.
//!
//! Key types ([`DeviceKey`], [`DataKey`], ed25519's `SigningKey`) are zeroed when dropped and
//! print no key material with `Debug`.
//!
//! # Bundle (format version 1), little endian
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `KEELBNDL` |
//! | 8 | 2 | format version (1) |
//! | 10 | 2 | header length (32) |
//! | 12 | 4 | flags (0) |
//! | 16 | 8 | generation (> 0; a device accepts only a generation above the one in force) |
//! | 24 | 4 | body length N |
//! | 28 | 4 | reserved (0) |
//! | 32 | N | body: postcard of `{ device: Device, keys: [{ namespace: u16, nonce: [u8; 24], sealed: bytes }] }` |
//! | 32 + N | 64 | Ed25519 signature over bytes 0 .. 32 + N (all zeroes: unsigned, refused) |
//!
//! The body's postcard value is the first format; later fields follow it in sections that
//! bundles made before them simply lack (each optional, in this order; postcard: integers are
//! LEB128 varints, a list is a varint count then its items, `[u8; n]` is n raw bytes):
//!
//! | section | present when | bytes |
//! |---|---|---|
//! | QoS | the description has QoS rules, or a section below follows | postcard of `{ namespaces, groups, hosts, functions }` ([`qos::Qos`]); no rules: `00 00 00 00` |
//! | QoS settings | `drive_max_inflight` is set | `51 6F 53 31` (`QoS1`), varint `drive_max_inflight` |
//! | NGUIDs | namespaces exported by emulated functions ([`model::assign_nguids`]) | `4E 47 55 31` (`NGU1`), varint count, then per namespace: varint index into `namespaces`, the 16 NGUID bytes |
//!
//! Firmware that predates a section refuses a bundle that has it (bytes after the last
//! section it knows): malformed, the configuration in force stays.
//!
//! A bundle is exactly 96 + N bytes, at most [`flash::CONFIG_PAYLOAD_MAX`].
//! [`verify_and_open`] checks, in order: framing, signature (strict Ed25519) against the
//! trusted key, generation (rollback), body decoding, [`validate`], key unwrapping.
//!
//! # Flash layout (QEMU `virt` pflash bank 0, 64 MiB, 256 KiB sectors)
//!
//! | offset | size | content |
//! |---:|---:|---|
//! | `0x000_0000` | 30.5 MiB | slot A payload: the raw arm64 image (the CPU starts executing at flash 0, so it starts there) |
//! | `0x1E8_0000` | 256 KiB | slot A image header (first 512 bytes; rest erased) |
//! | `0x1EC_0000` | 30.5 MiB | slot B payload |
//! | `0x3D4_0000` | 256 KiB | slot B image header |
//! | `0x3D8_0000` | 512 KiB | health area: two sectors of 64-byte records (power cycles, unsafe shutdowns, power-on time; [`flash::HealthRecord`]) |
//! | `0x3E0_0000` | 1 MiB | configuration copy A |
//! | `0x3F0_0000` | 1 MiB | configuration copy B |
//!
//! The image header sits at the *end* of its slot so that a flash boot still executes the raw
//! image's first instruction at offset 0. Erased flash reads 0xFF.
//!
//! ## Image header (512 bytes, version 1)
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `KEELIMG\0` |
//! | 8 | 2 | header version (1) |
//! | 10 | 2 | header length (512) |
//! | 12 | 4 | flags (0) |
//! | 16 | 32 | firmware version, UTF-8, NUL padded |
//! | 48 | 32 | build id, UTF-8, NUL padded |
//! | 80 | 32 | board name, UTF-8, NUL padded (`qemu-virt`) |
//! | 112 | 8 | load address |
//! | 120 | 8 | payload offset from the slot base (0; relative, so a signed header is valid in either slot) |
//! | 128 | 8 | payload size |
//! | 136 | 8 | memory size (arm64 header image_size) |
//! | 144 | 32 | SHA-256 of the payload |
//! | 176 | 32 | signer's Ed25519 public key |
//! | 208 | 240 | reserved (0) |
//! | 448 | 64 | Ed25519 signature over bytes 0..448 |
//!
//! ## Configuration copy (at the start of each 1 MiB copy)
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `KCFG` |
//! | 4 | 2 | version (1) |
//! | 6 | 2 | header length (32) |
//! | 8 | 8 | sequence number |
//! | 16 | 4 | payload length L (≤ 1 MiB − 32) |
//! | 20 | 8 | reserved (0) |
//! | 28 | 4 | CRC32C (Castagnoli) over bytes 0..28 and the payload |
//! | 32 | L | payload: a bundle |
//!
//! The copy in force is the valid one with the highest sequence number ([`choose_config`]);
//! a new configuration overwrites the other copy with the next sequence number
//! ([`next_config_write`]), so a torn write leaves the previous configuration in force.
//!
//! # Device identity (QEMU `virt` pflash bank 1)
//!
//! The device key lives in a 64-byte identity block at offset 0 of pflash bank 1
//! ([`identity`]: magic `KEELIDNT`, version, key, CRC32C), written by `keelctl provision
//! identity`. That is the QEMU stand-in: a real DPU keeps its device key in OTP/eFuses or a
//! secure element that software able to read the flash cannot read.
//!
//! # Live changes
//!
//! [`diff()`] says what a pushed description changes against the one in force: namespaces
//! added to or removed from running subsystems are applied live, everything else is
//! reported as taking effect at the next boot.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod bundle;
pub mod diff;
pub mod flash;
pub mod identity;
pub mod image;
pub mod keys;
pub mod model;
pub mod qos;
#[cfg(feature = "std")]
pub mod toml;

pub use bundle::{
    BundleError, BundleHeader, Config, build, build_with_keys, inspect, verify_and_open,
};
pub use diff::{ConfigDiff, diff};
pub use ed25519_dalek;
pub use flash::{ConfigCopy, ConfigWrite, Slot, choose_config, next_config_write};
pub use identity::{IdentityError, encode_identity, parse_identity};
pub use image::{ImageError, ImageHeader};
pub use keys::{DataKey, DeviceKey};
pub use model::{
    Backend, Device, Encryption, Management, Namespace, Network, Remote, RemotePolicy, Subsystem,
    assign_nguids, validate,
};
pub use qos::{
    DRIVE_MAX_INFLIGHT, FunctionQos, HostQos, NamespaceQos, Qos, QosGroup, QosLimits, QosRate,
};
#[cfg(feature = "std")]
pub use toml::{Error, parse_toml};
