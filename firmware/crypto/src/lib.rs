//! Inline encryption at rest for Keel namespaces: AES-XTS (IEEE Std 1619-2018, XTS-AES-128
//! and XTS-AES-256) with the logical block as the data unit and its LBA as the tweak (data unit
//! sequence number, little-endian), applied by [`EncryptedBackend`], a wrapper around any
//! [`BlockBackend`]: writes are encrypted in place in their buffer before they reach the
//! backend, reads decrypted in place after it completes. Every transport and every backend
//! (RAM, drive, slice) gets the same treatment because the wrapper sits between the controller
//! core and the backend.
//!
//! Keys ([`XtsKey`]) are zeroed when dropped, print as `<redacted>`, and a key whose two halves
//! are equal is refused (IEEE 1619 §5.1 requires Key1 ≠ Key2; OpenSSL refuses it too). The
//! expanded AES round keys are zeroed on drop as well (the `aes` crate's `zeroize` feature).
//!
//! XTS itself is implemented here (IEEE 1619 §5.3.1 without ciphertext stealing: data units
//! are logical blocks, multiples of 16 bytes) so that blocks go to the AES implementation in
//! batches of 32 and its pipelined paths are used; it is checked against the standard's
//! vectors and, in the tests, against the `xts-mode` crate.
//!
//! Hardware: on aarch64 compiled with the `aes` target feature (the firmware's baseline: bare-
//! metal targets have no run-time detection, so the firmware checks ID_AA64ISAR0_EL1 at boot
//! before it serves an encrypted namespace), XTS runs in `armv8`, written against the Armv8
//! Cryptography Extension (AESE/AESD/AESMC/AESIMC) directly: about 2.3 instructions per byte
//! with AES-256. Elsewhere (x86_64 hosts: tests, benchmarks) the `aes` crate does the blocks
//! (AES-NI detected at run time) and this crate the XTS around them.
//!
//! Semantics with encryption:
//! - Write Zeroes is not passed to the backend (zeroed ciphertext would decrypt to noise): the
//!   wrapper reports no `write_zeroes` capability and the controller core writes encrypted
//!   zeroes instead (Write requests of zero-filled buffers, encrypted here like any write).
//! - Deallocate is passed through (the backend may release the blocks), but deallocated blocks
//!   read back as the decryption of whatever the backend returns (zeroes decrypt to noise):
//!   the capability `deallocate_reads_zero` is off, so DLFEAT reports "not reported" (000b)
//!   and hosts do not rely on it.
//! - Verify is passed through: the backend reads the ciphertext blocks. XTS carries no
//!   integrity tag, so decrypting them could not detect anything more.
//! - Compare encrypts the host's data and compares ciphertext.
//! - Abort is forwarded to the backend for requests in flight through the wrapper.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
mod armv8;
#[cfg(any(
    not(all(target_arch = "aarch64", target_feature = "aes")),
    feature = "portable"
))]
mod portable;

#[cfg(any(
    not(all(target_arch = "aarch64", target_feature = "aes")),
    feature = "portable"
))]
use aes::cipher::KeyInit;
#[cfg(any(
    not(all(target_arch = "aarch64", target_feature = "aes")),
    feature = "portable"
))]
use aes::{Aes128, Aes256};
use alloc::vec::Vec;
use core::fmt;
use keel_storage::{
    BlockBackend, BlockCompletion, BlockError, BlockOp, BlockRequest, Capabilities, Geometry,
    NowIo, RejectReason, Rejected,
};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The XTS cipher of a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// XTS-AES-128 (a 32-byte key: two AES-128 keys).
    Aes128Xts,
    /// XTS-AES-256 (a 64-byte key: two AES-256 keys).
    Aes256Xts,
}

impl Cipher {
    /// Key length in bytes.
    pub const fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Xts => 32,
            Cipher::Aes256Xts => 64,
        }
    }

    /// The configuration name: `aes-128-xts` or `aes-256-xts`.
    pub const fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Xts => "aes-128-xts",
            Cipher::Aes256Xts => "aes-256-xts",
        }
    }

    /// Parses a configuration name.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "aes-128-xts" => Some(Cipher::Aes128Xts),
            "aes-256-xts" => Some(Cipher::Aes256Xts),
            _ => None,
        }
    }
}

/// Why a key was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// Not 32 (XTS-AES-128) or 64 (XTS-AES-256) bytes.
    Length(usize),
    /// Key1 equals Key2.
    EqualHalves,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Length(n) => write!(f, "an XTS key is 32 or 64 bytes, not {n}"),
            KeyError::EqualHalves => f.write_str("the two halves of the XTS key are equal"),
        }
    }
}

/// An XTS key: Key1 (data) followed by Key2 (tweak). Zeroed on drop; never printed.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct XtsKey {
    bytes: [u8; 64],
    len: u8,
}

impl fmt::Debug for XtsKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "XtsKey({}, <redacted>)", self.cipher().name())
    }
}

impl XtsKey {
    /// Takes a 32- or 64-byte key.
    pub fn new(key: &[u8]) -> Result<Self, KeyError> {
        if key.len() != 32 && key.len() != 64 {
            return Err(KeyError::Length(key.len()));
        }
        let (k1, k2) = key.split_at(key.len() / 2);
        if k1 == k2 {
            return Err(KeyError::EqualHalves);
        }
        let mut bytes = [0u8; 64];
        bytes[..key.len()].copy_from_slice(key);
        Ok(Self {
            bytes,
            len: key.len() as u8,
        })
    }

    /// Parses a key written as hexadecimal digits (64 or 128 of them). The digits are not kept.
    pub fn from_hex(hex: &str) -> Result<Self, KeyError> {
        let mut raw = [0u8; 64];
        let digits = hex.as_bytes();
        if !digits.len().is_multiple_of(2) || digits.len() > 128 {
            return Err(KeyError::Length(digits.len() / 2));
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        for (i, pair) in digits.chunks(2).enumerate() {
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(h), Some(l)) => raw[i] = (h << 4) | l,
                _ => {
                    raw.zeroize();
                    return Err(KeyError::Length(0));
                }
            }
        }
        let r = Self::new(&raw[..digits.len() / 2]);
        raw.zeroize();
        r
    }

    /// The cipher this key is for.
    pub fn cipher(&self) -> Cipher {
        if self.len == 32 {
            Cipher::Aes128Xts
        } else {
            Cipher::Aes256Xts
        }
    }

    fn halves(&self) -> (&[u8], &[u8]) {
        self.bytes[..self.len as usize].split_at(self.len as usize / 2)
    }
}

// Key schedules live on the heap, once per namespace.
enum Engine {
    #[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
    Armv8Aes128(alloc::boxed::Box<armv8::XtsKeys<11>>),
    #[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
    Armv8Aes256(alloc::boxed::Box<armv8::XtsKeys<15>>),
    #[cfg(any(
        not(all(target_arch = "aarch64", target_feature = "aes")),
        feature = "portable"
    ))]
    Aes128(alloc::boxed::Box<(Aes128, Aes128)>),
    #[cfg(any(
        not(all(target_arch = "aarch64", target_feature = "aes")),
        feature = "portable"
    ))]
    Aes256(alloc::boxed::Box<(Aes256, Aes256)>),
}

impl Engine {
    /// The `aes` crate's block functions under this crate's XTS.
    #[cfg(any(
        not(all(target_arch = "aarch64", target_feature = "aes")),
        feature = "portable"
    ))]
    fn portable(key: &XtsKey) -> Self {
        let (k1, k2) = key.halves();
        match key.cipher() {
            Cipher::Aes128Xts => Engine::Aes128(alloc::boxed::Box::new((
                Aes128::new_from_slice(k1).expect("16-byte half"),
                Aes128::new_from_slice(k2).expect("16-byte half"),
            ))),
            Cipher::Aes256Xts => Engine::Aes256(alloc::boxed::Box::new((
                Aes256::new_from_slice(k1).expect("32-byte half"),
                Aes256::new_from_slice(k2).expect("32-byte half"),
            ))),
        }
    }

    /// The fastest implementation this build has.
    fn best(key: &XtsKey) -> Self {
        #[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
        {
            let (k1, k2) = key.halves();
            match key.cipher() {
                Cipher::Aes128Xts => {
                    Engine::Armv8Aes128(alloc::boxed::Box::new(armv8::XtsKeys::new(k1, k2)))
                }
                Cipher::Aes256Xts => {
                    Engine::Armv8Aes256(alloc::boxed::Box::new(armv8::XtsKeys::new(k1, k2)))
                }
            }
        }
        #[cfg(not(all(target_arch = "aarch64", target_feature = "aes")))]
        Self::portable(key)
    }

    fn run(&self, data: &mut [u8], unit: usize, first: u64, decrypt: bool) {
        match self {
            #[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
            Engine::Armv8Aes128(k) => k.run(data, unit, first, decrypt),
            #[cfg(all(target_arch = "aarch64", target_feature = "aes"))]
            Engine::Armv8Aes256(k) => k.run(data, unit, first, decrypt),
            #[cfg(any(
                not(all(target_arch = "aarch64", target_feature = "aes")),
                feature = "portable"
            ))]
            Engine::Aes128(k) => portable::run(&k.0, &k.1, data, unit, first, decrypt),
            #[cfg(any(
                not(all(target_arch = "aarch64", target_feature = "aes")),
                feature = "portable"
            ))]
            Engine::Aes256(k) => portable::run(&k.0, &k.1, data, unit, first, decrypt),
        }
    }
}

/// An expanded XTS key ready to encrypt and decrypt logical blocks.
pub struct Xts {
    engine: Engine,
    cipher: Cipher,
}

impl fmt::Debug for Xts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Xts({}, <redacted>)", self.cipher.name())
    }
}

impl Xts {
    /// Expands a key.
    pub fn new(key: &XtsKey) -> Self {
        Self {
            engine: Engine::best(key),
            cipher: key.cipher(),
        }
    }

    /// The same key on the portable path (the `aes` crate's block functions), whatever this
    /// build has: what the firmware's test build compares the Armv8 path with. On aarch64
    /// with the `aes` target feature, only with this crate's `portable` feature.
    #[cfg(any(
        not(all(target_arch = "aarch64", target_feature = "aes")),
        feature = "portable"
    ))]
    pub fn portable(key: &XtsKey) -> Self {
        Self {
            engine: Engine::portable(key),
            cipher: key.cipher(),
        }
    }

    /// Whether this build encrypts through its own Armv8 Cryptography Extension path rather
    /// than the `aes` crate's block functions.
    pub const fn armv8() -> bool {
        cfg!(all(target_arch = "aarch64", target_feature = "aes"))
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    fn run(&self, data: &mut [u8], block_size: usize, first_lba: u64, decrypt: bool) {
        let unit = block_size.max(16) & !15;
        self.engine.run(data, unit, first_lba, decrypt);
    }

    /// Encrypts whole logical blocks in place; the first one is `first_lba`. `data.len()` must
    /// be a multiple of `block_size` (a multiple of 16); a trailing partial block is left
    /// untouched.
    pub fn encrypt(&self, data: &mut [u8], block_size: usize, first_lba: u64) {
        self.run(data, block_size, first_lba, false);
    }

    /// Decrypts whole logical blocks in place (see [`Xts::encrypt`]).
    pub fn decrypt(&self, data: &mut [u8], block_size: usize, first_lba: u64) {
        self.run(data, block_size, first_lba, true);
    }
}

/// What the wrapper remembers of a request in flight, to decrypt its data when it completes.
#[derive(Clone, Copy, Debug)]
struct Slot {
    tag: u64,
    lba: u64,
    offset: usize,
    len: usize,
    decrypt_on_completion: bool,
}

/// A backend whose data is encrypted with AES-XTS on its way in and decrypted on its way out.
pub struct EncryptedBackend<B> {
    inner: B,
    xts: Xts,
    geometry: Geometry,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
}

impl<B> fmt::Debug for EncryptedBackend<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedBackend")
            .field("cipher", &self.xts.cipher)
            .field("in_flight", &(self.slots.len() - self.free.len()))
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> EncryptedBackend<B> {
    /// Wraps `inner`; at most `depth` requests are in flight through the wrapper (more are
    /// refused as Busy and retried by the caller).
    pub fn new(inner: B, key: &XtsKey, depth: usize) -> Self {
        let depth = depth.clamp(1, u32::MAX as usize);
        Self {
            geometry: inner.geometry(),
            inner,
            xts: Xts::new(key),
            slots: alloc::vec![None; depth],
            free: (0..depth as u32).rev().collect(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.xts.cipher
    }
}

impl<B: BlockBackend> BlockBackend for EncryptedBackend<B> {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn capabilities(&self) -> Capabilities {
        let inner = self.inner.capabilities();
        Capabilities {
            write_zeroes: false,
            deallocate_reads_zero: false,
            ..inner
        }
    }

    fn abort(&mut self, tag: u64) -> bool {
        let index = self
            .slots
            .iter()
            .position(|s| matches!(s, Some(s) if s.tag == tag));
        match index {
            Some(i) => self.inner.abort(i as u64),
            None => false,
        }
    }

    fn submit(&mut self, mut req: BlockRequest) -> Result<(), Rejected> {
        let range = match req.validate(self.geometry, self.capabilities()) {
            Ok(r) => r,
            Err(e) => {
                return Err(Rejected {
                    reason: RejectReason::Invalid(e),
                    req,
                });
            }
        };
        let Some(index) = self.free.pop() else {
            return Err(Rejected {
                reason: RejectReason::Busy,
                req,
            });
        };
        let bs = self.geometry.block_size as usize;
        let encrypt_now = matches!(req.op, BlockOp::Write { .. } | BlockOp::Compare);
        if encrypt_now && let Some(buf) = req.buf.as_mut() {
            self.xts
                .encrypt(&mut buf.as_mut_slice()[range.clone()], bs, req.lba);
        }
        let slot = Slot {
            tag: req.tag,
            lba: req.lba,
            offset: range.start,
            len: range.len(),
            decrypt_on_completion: req.op == BlockOp::Read,
        };
        self.slots[index as usize] = Some(slot);
        req.tag = u64::from(index);
        match self.inner.submit(req) {
            Ok(()) => Ok(()),
            Err(mut rejected) => {
                // Hand the request back exactly as it came: plaintext, the caller's tag.
                self.slots[index as usize] = None;
                self.free.push(index);
                if encrypt_now && let Some(buf) = rejected.req.buf.as_mut() {
                    self.xts.decrypt(
                        &mut buf.as_mut_slice()[slot.offset..slot.offset + slot.len],
                        bs,
                        slot.lba,
                    );
                }
                rejected.req.tag = slot.tag;
                Err(rejected)
            }
        }
    }

    /// Reads move now when the inner backend's do: the ciphertext lands in the caller's memory
    /// and is decrypted there, in place. Writes always take a buffer: the ciphertext needs
    /// memory of its own (the caller's data is not ours to overwrite).
    fn moves_data_now(&self) -> NowIo {
        NowIo {
            read: self.inner.moves_data_now().read,
            write: false,
        }
    }

    fn read_now(&mut self, lba: u64, blocks: u32, dst: &mut [u8]) -> Result<(), BlockError> {
        self.geometry.check_now(lba, blocks, dst.len())?;
        self.inner.read_now(lba, blocks, dst)?;
        self.xts
            .decrypt(dst, self.geometry.block_size as usize, lba);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(BlockCompletion)) -> usize {
        let Self {
            inner,
            xts,
            slots,
            free,
            geometry,
            ..
        } = self;
        let bs = geometry.block_size as usize;
        inner.poll(&mut |mut c: BlockCompletion| {
            let index = c.tag as usize;
            let Some(slot) = slots.get_mut(index).and_then(Option::take) else {
                // Not ours: cannot happen with a well-behaved inner backend.
                c.result = Err(BlockError::Internal);
                done(c);
                return;
            };
            free.push(index as u32);
            if slot.decrypt_on_completion
                && c.result.is_ok()
                && let Some(buf) = c.buf.as_mut()
                && let Some(area) = buf
                    .as_mut_slice()
                    .get_mut(slot.offset..slot.offset + slot.len)
            {
                xts.decrypt(area, bs, slot.lba);
            }
            c.tag = slot.tag;
            done(c);
        })
    }
}
