//! XTS-AES with the Armv8 Cryptography Extension, written against the instructions directly
//! (AESE/AESMC, AESD/AESIMC) instead of through the `aes` crate's block API: the whole data
//! unit runs in one function with the round keys in vector registers, eight blocks interleaved
//! per round (the instructions pipeline), the tweaks doubled in vector registers (IEEE 1619
//! §5.2, five instructions per block) and the data loaded and stored once, in place. About 36
//! instructions per 16-byte block with AES-256 (2.3 per byte) against ~270 through the block
//! API (which copies every block twice and keeps nothing in registers between calls).
//!
//! Compiled only for aarch64 with the `aes` target feature (the firmware's baseline, see
//! `.cargo/config.toml`); the firmware checks ID_AA64ISAR0_EL1 at boot before it serves an
//! encrypted namespace. On the target, `keel.test=selftest` compares this path with the
//! `aes` crate's ([`crate::Xts::portable`]) and runs the IEEE 1619 vectors through it.
#![allow(
    unsafe_code,
    reason = "vector loads and stores of 16-byte blocks in inline assembly"
)]

use core::arch::aarch64::*;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Expanded round keys of one AES key: `N` = 11 (AES-128) or 15 (AES-256), as bytes so that
/// they can be zeroed; loaded into vector registers once per call.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct RoundKeys<const N: usize>([[u8; 16]; N]);

/// The keys of one XTS key: Key1 for encryption and (equivalent inverse cipher) decryption,
/// Key2 for the tweak.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct XtsKeys<const N: usize> {
    enc1: RoundKeys<N>,
    dec1: RoundKeys<N>,
    enc2: RoundKeys<N>,
}

impl<const N: usize> XtsKeys<N> {
    /// Expands Key1 and Key2 (each 16 bytes for `N` = 11, 32 bytes for `N` = 15).
    pub(crate) fn new(k1: &[u8], k2: &[u8]) -> Self {
        // SAFETY: this module is compiled only with the `aes` target feature (the firmware's
        // CPU baseline, checked against ID_AA64ISAR0_EL1 at boot).
        let (enc1, enc2) = unsafe { (expand::<N>(k1), expand::<N>(k2)) };
        // SAFETY: as above.
        let dec1 = unsafe { inverse(&enc1) };
        Self { enc1, dec1, enc2 }
    }

    /// XTS-AES of the data units of `data` (each `unit` bytes, a multiple of 16), in place; the
    /// first unit's sequence number is `dusn`.
    pub(crate) fn run(&self, data: &mut [u8], unit: usize, dusn: u64, decrypt: bool) {
        for (i, u) in data.chunks_exact_mut(unit).enumerate() {
            let n = dusn.wrapping_add(i as u64);
            // SAFETY: this module is compiled only with the `aes` target feature (the
            // firmware's CPU baseline, checked against ID_AA64ISAR0_EL1 at boot).
            unsafe {
                if decrypt {
                    xts_unit::<N, true>(&self.dec1, &self.enc2, u, n);
                } else {
                    xts_unit::<N, false>(&self.enc1, &self.enc2, u, n);
                }
            }
        }
    }
}

// Loads and stores of 16-byte blocks as single LD1/ST1 instructions of byte elements (no
// alignment requirement): the firmware target is compiled with strict alignment, under which
// LLVM assembles a vector load or store of unknown alignment (what `vld1q_u8` is) byte by byte,
// 16 loads and 15 ORs per block.
#[inline]
#[target_feature(enable = "aes")]
fn load(b: &[u8; 16]) -> uint8x16_t {
    let v: uint8x16_t;
    // SAFETY: `b` is 16 readable bytes; LD1 of byte elements reads exactly those and needs no
    // alignment.
    unsafe {
        core::arch::asm!(
            "ld1 {{{v:v}.16b}}, [{p}]",
            v = out(vreg) v,
            p = in(reg) b.as_ptr(),
            options(nostack, readonly, preserves_flags),
        )
    };
    v
}

#[inline]
#[target_feature(enable = "aes")]
fn store(b: &mut [u8; 16], v: uint8x16_t) {
    // SAFETY: `b` is 16 writable bytes; ST1 of byte elements writes exactly those and needs no
    // alignment.
    unsafe {
        core::arch::asm!(
            "st1 {{{v:v}.16b}}, [{p}]",
            v = in(vreg) v,
            p = in(reg) b.as_mut_ptr(),
            options(nostack, preserves_flags),
        )
    };
}

fn block(chunk: &[u8]) -> &[u8; 16] {
    chunk.try_into().expect("16-byte block")
}

fn block_mut(chunk: &mut [u8]) -> &mut [u8; 16] {
    chunk.try_into().expect("16-byte block")
}

/// SubWord (FIPS 197 §5.2) of a little-endian word, with AESE: with all four columns equal,
/// ShiftRows is the identity and AESE against a zero key leaves SubBytes.
#[target_feature(enable = "aes")]
fn sub_word(w: u32) -> u32 {
    vgetq_lane_u32::<0>(vreinterpretq_u32_u8(vaeseq_u8(
        vreinterpretq_u8_u32(vdupq_n_u32(w)),
        vdupq_n_u8(0),
    )))
}

/// The AES key expansion (FIPS 197 §5.2), words little-endian (byte 0 in bits 0-7).
#[target_feature(enable = "aes")]
fn expand<const N: usize>(key: &[u8]) -> RoundKeys<N> {
    let nk = key.len() / 4;
    debug_assert!((nk == 4 && N == 11) || (nk == 8 && N == 15));
    let mut w = [0u32; 60];
    for (i, c) in key.chunks_exact(4).enumerate() {
        w[i] = u32::from_le_bytes(c.try_into().expect("4-byte word"));
    }
    let mut rcon = 1u32;
    for i in nk..4 * N {
        let mut t = w[i - 1];
        if i % nk == 0 {
            // RotWord moves byte 0 to byte 3: a right rotation of the little-endian word.
            t = sub_word(t.rotate_right(8)) ^ rcon;
            rcon = (rcon << 1) ^ (0x11b & 0u32.wrapping_sub(rcon >> 7));
        } else if nk > 6 && i % nk == 4 {
            t = sub_word(t);
        }
        w[i] = w[i - nk] ^ t;
    }
    let mut rk = RoundKeys([[0u8; 16]; N]);
    for (r, k) in rk.0.iter_mut().enumerate() {
        for (j, b) in k.chunks_exact_mut(4).enumerate() {
            b.copy_from_slice(&w[4 * r + j].to_le_bytes());
        }
    }
    w.zeroize();
    rk
}

/// Round keys of the equivalent inverse cipher (FIPS 197 §5.3.5) for AESD/AESIMC: the
/// encryption keys in reverse order, InvMixColumns applied to all but the first and last.
#[target_feature(enable = "aes")]
fn inverse<const N: usize>(enc: &RoundKeys<N>) -> RoundKeys<N> {
    let mut dec = RoundKeys([[0u8; 16]; N]);
    for (i, d) in dec.0.iter_mut().enumerate() {
        let k = load(&enc.0[N - 1 - i]);
        store(
            d,
            if i == 0 || i == N - 1 {
                k
            } else {
                vaesimcq_u8(k)
            },
        );
    }
    dec
}

/// One block through all rounds.
#[inline]
#[target_feature(enable = "aes")]
fn cipher1<const N: usize, const DEC: bool>(rk: &[uint8x16_t; N], mut b: uint8x16_t) -> uint8x16_t {
    for k in &rk[..N - 2] {
        b = if DEC {
            vaesimcq_u8(vaesdq_u8(b, *k))
        } else {
            vaesmcq_u8(vaeseq_u8(b, *k))
        };
    }
    b = if DEC {
        vaesdq_u8(b, rk[N - 2])
    } else {
        vaeseq_u8(b, rk[N - 2])
    };
    veorq_u8(b, rk[N - 1])
}

/// Blocks interleaved per round: independent AESE/AESMC pairs keep the pipeline full, and
/// 8 blocks + 8 tweaks + 15 round keys still fit in the 32 vector registers.
const LANES: usize = 8;

/// The tweak times α in GF(2^128) (IEEE 1619 §5.2), the tweak as two little-endian 64-bit
/// lanes: shift left by one across the lanes, fold the bit shifted out of the top into the
/// bottom as 0x87.
#[inline]
#[target_feature(enable = "aes")]
fn times_alpha(t: uint64x2_t) -> uint64x2_t {
    const POLY: [u64; 2] = [0x87, 1];
    // Both lanes' top bits as all-ones masks, swapped: lane 0 gets the high lane's carry (to
    // fold as 0x87), lane 1 the low lane's (to carry in as 1).
    let carry = vreinterpretq_u64_s64(vshrq_n_s64::<63>(vreinterpretq_s64_u64(t)));
    let carry = vextq_u64::<1>(carry, carry);
    let poly = vcombine_u64(vcreate_u64(POLY[0]), vcreate_u64(POLY[1]));
    veorq_u64(vshlq_n_u64::<1>(t), vandq_u64(carry, poly))
}

#[target_feature(enable = "aes")]
fn xts_unit<const N: usize, const DEC: bool>(
    data_rk: &RoundKeys<N>,
    tweak_rk: &RoundKeys<N>,
    unit: &mut [u8],
    dusn: u64,
) {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&dusn.to_le_bytes());
    let trk: [uint8x16_t; N] = core::array::from_fn(|i| load(&tweak_rk.0[i]));
    let mut tweak = vreinterpretq_u64_u8(cipher1::<N, false>(&trk, load(&t)));
    let rk: [uint8x16_t; N] = core::array::from_fn(|i| load(&data_rk.0[i]));

    let mut groups = unit.chunks_exact_mut(16 * LANES);
    for group in &mut groups {
        let mut tw = [vdupq_n_u64(0); LANES];
        let mut b = [vdupq_n_u8(0); LANES];
        for i in 0..LANES {
            tw[i] = tweak;
            tweak = times_alpha(tweak);
            let x = load(block(&group[16 * i..16 * i + 16]));
            b[i] = veorq_u8(x, vreinterpretq_u8_u64(tw[i]));
        }
        for k in &rk[..N - 2] {
            for x in &mut b {
                *x = if DEC {
                    vaesimcq_u8(vaesdq_u8(*x, *k))
                } else {
                    vaesmcq_u8(vaeseq_u8(*x, *k))
                };
            }
        }
        for i in 0..LANES {
            let x = if DEC {
                vaesdq_u8(b[i], rk[N - 2])
            } else {
                vaeseq_u8(b[i], rk[N - 2])
            };
            let x = veorq_u8(x, veorq_u8(rk[N - 1], vreinterpretq_u8_u64(tw[i])));
            store(block_mut(&mut group[16 * i..16 * i + 16]), x);
        }
    }
    // Units that are not a multiple of 128 bytes: the rest one block at a time.
    for chunk in groups.into_remainder().chunks_exact_mut(16) {
        let tw = vreinterpretq_u8_u64(tweak);
        tweak = times_alpha(tweak);
        let x = cipher1::<N, DEC>(&rk, veorq_u8(load(block(chunk)), tw));
        store(block_mut(chunk), veorq_u8(x, tw));
    }
}
