//! XTS over the `aes` crate's block functions: the path of builds without the Armv8 one (x86_64
//! hosts: tests, benchmarks) and, with the `portable` feature, the reference the firmware's
//! test build compares the Armv8 path with.

use aes::cipher::{Block, BlockCipherDecrypt, BlockCipherEncrypt};

/// Blocks handed to the AES implementation at once, so its parallel (pipelined AES-NI /
/// Armv8 AESE) paths are used instead of one block per call.
const BATCH: usize = 32;

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619 §5.2, little-endian byte order).
#[inline]
fn times_alpha(t: u128) -> u128 {
    (t << 1) ^ (((t as i128) >> 127) as u128 & 0x87)
}

/// XORs `t` into a 16-byte block.
#[inline]
fn xor_block(b: &mut [u8], t: u128) {
    let x = u128::from_le_bytes((&*b).try_into().expect("16-byte block")) ^ t;
    b.copy_from_slice(&x.to_le_bytes());
}

/// XTS-AES of one data unit (a multiple of 16 bytes), in place: `k1` encrypts or decrypts the
/// data, `k2` encrypts the tweak (the data unit sequence number, little-endian). The blocks
/// are whitened in place and handed to the AES implementation `BATCH` at a time.
fn xts_unit<C>(k1: &C, k2: &C, unit: &mut [u8], dusn: u64, decrypt: bool)
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let mut t = Block::<C>::default();
    t[..8].copy_from_slice(&dusn.to_le_bytes());
    k2.encrypt_block(&mut t);
    let mut tweak = u128::from_le_bytes(t.into());
    let mut tweaks = [0u128; BATCH];
    let (blocks, _) = Block::<C>::slice_as_chunks_mut(unit);
    for chunk in blocks.chunks_mut(BATCH) {
        for (b, tw) in chunk.iter_mut().zip(tweaks.iter_mut()) {
            *tw = tweak;
            xor_block(b, tweak);
            tweak = times_alpha(tweak);
        }
        if decrypt {
            k1.decrypt_blocks(chunk);
        } else {
            k1.encrypt_blocks(chunk);
        }
        for (b, tw) in chunk.iter_mut().zip(tweaks.iter()) {
            xor_block(b, *tw);
        }
    }
}

/// XTS-AES of the data units of `data` (each `unit` bytes, a multiple of 16), in place; the
/// first unit's sequence number is `first`.
pub(crate) fn run<C>(k1: &C, k2: &C, data: &mut [u8], unit: usize, first: u64, decrypt: bool)
where
    C: BlockCipherEncrypt
        + BlockCipherDecrypt
        + aes::cipher::BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    for (i, u) in data.chunks_exact_mut(unit).enumerate() {
        xts_unit(k1, k2, u, first.wrapping_add(i as u64), decrypt);
    }
}
