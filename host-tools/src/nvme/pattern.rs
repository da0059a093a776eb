//! Deterministic data patterns for `verify`, stamped blocks for `bench --verify` and the
//! crash-consistency tests, a small PRNG for `bench`, and size parsing.
//!
//! The pattern is a function of (seed, absolute byte address): every 8-byte-aligned word at
//! namespace byte address `a` holds `splitmix64(seed ^ (a / 8) × φ)`, little-endian. The same
//! LBA range therefore always gets the same bytes whatever the chunking, and a mismatch can
//! be reported by its exact offset.
//!
//! A stamped block ([`stamp_block`]) says what wrote it: a header (magic `KEELCRSH`, its LBA,
//! the generation of the command that wrote it, its index in that command and the command's
//! length), the pattern of that generation, and an FNV-1a checksum of all of it, so a block
//! read back ([`read_stamp`]) is all zeroes, exactly one known version, foreign, or damaged
//! (torn, misdirected), never ambiguous.

/// SplitMix64 finaliser (Steele, Lea, Flood 2014).
pub const fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The pattern word at 8-byte word index `word`.
pub fn word(seed: u64, word: u64) -> u64 {
    splitmix64(seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Fills `buf` with the pattern of the bytes starting at namespace byte address `addr`.
pub fn fill(buf: &mut [u8], seed: u64, addr: u64) {
    let mut i = 0;
    while i < buf.len() {
        let a = addr + i as u64;
        let w = word(seed, a / 8).to_le_bytes();
        let start = (a % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&w[start..start + n]);
        i += n;
    }
}

/// The marker at the start of every stamped block.
pub const STAMP_MAGIC: [u8; 8] = *b"KEELCRSH";

/// FNV-1a, 64-bit.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Fills `block` (at least 40 bytes) with the stamped content of `lba`, written by command
/// `generation` as its block `index` of `count`.
pub fn stamp_block(block: &mut [u8], lba: u64, generation: u64, index: u32, count: u32) {
    let n = block.len();
    block[..8].copy_from_slice(&STAMP_MAGIC);
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&generation.to_le_bytes());
    block[24..28].copy_from_slice(&index.to_le_bytes());
    block[28..32].copy_from_slice(&count.to_le_bytes());
    fill(&mut block[32..n - 8], generation, lba * n as u64);
    let sum = fnv(&block[..n - 8]);
    block[n - 8..].copy_from_slice(&sum.to_le_bytes());
}

/// What a block read back holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// All zero bytes.
    Zero,
    /// A stamped block of this LBA, whole, written by the command of this generation.
    Gen(u64),
    /// Not a stamped block (by hash).
    Foreign(u64),
    /// A stamped block whose checksum or LBA does not hold (by hash).
    Damaged(u64),
}

/// Reads the stamp of `block`, read back at `lba`.
pub fn read_stamp(block: &[u8], lba: u64) -> Stamp {
    let n = block.len();
    if block.iter().all(|&b| b == 0) {
        return Stamp::Zero;
    }
    if n < 40 || block[..8] != STAMP_MAGIC {
        return Stamp::Foreign(fnv(block));
    }
    let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap_or([0; 8]));
    if word(n - 8) != fnv(&block[..n - 8]) || word(8) != lba {
        return Stamp::Damaged(fnv(block));
    }
    Stamp::Gen(word(16))
}

/// Mismatches between `got` and `want`: the total count and the first `keep` offsets.
pub fn mismatches(got: &[u8], want: &[u8], keep: usize) -> (u64, Vec<usize>) {
    let mut count = 0u64;
    let mut first = Vec::new();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            count += 1;
            if first.len() < keep {
                first.push(i);
            }
        }
    }
    let extra = got.len().abs_diff(want.len()) as u64;
    (count + extra, first)
}

/// xorshift64* (Vigna 2016): fast, good enough to pick LBAs.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (any seed, zero included).
    pub fn new(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Parses a size: a number with an optional binary unit (`512`, `4k`, `4KiB`, `1M`, `2g`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (k, m, g, t)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// "4 KiB", "1 MiB", "1536 B".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut i = 0;
    let mut v = n;
    while i + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
        v /= 1024;
        i += 1;
    }
    if v >= 1024 * 10 && i + 1 < UNITS.len() {
        // Not an exact multiple: one decimal.
        let x = n as f64 / (1u64 << (10 * (i + 1))) as f64;
        return format!("{x:.1} {}", UNITS[i + 1]);
    }
    format!("{v} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_based() {
        let mut whole = vec![0u8; 4096];
        fill(&mut whole, 7, 512 * 10);
        // Filling in odd pieces gives the same bytes.
        let mut pieces = vec![0u8; 4096];
        fill(&mut pieces[..13], 7, 512 * 10);
        fill(&mut pieces[13..1000], 7, 512 * 10 + 13);
        fill(&mut pieces[1000..], 7, 512 * 10 + 1000);
        assert_eq!(whole, pieces);
        // Other seeds and addresses differ.
        let mut other = vec![0u8; 4096];
        fill(&mut other, 8, 512 * 10);
        assert_ne!(whole, other);
        fill(&mut other, 7, 512 * 11);
        assert_ne!(whole, other);
        // Not trivially repetitive: each 512-byte block differs from the next.
        assert_ne!(whole[..512], whole[512..1024]);
        assert_eq!(whole[..8], word(7, 5120 / 8).to_le_bytes());
    }

    fn stamped(lba: u64, generation: u64) -> Vec<u8> {
        let mut b = vec![0u8; 512];
        stamp_block(&mut b, lba, generation, 0, 1);
        b
    }

    #[test]
    fn stamped_blocks_read_back_as_written_and_damage_shows() {
        assert_eq!(read_stamp(&stamped(7, 42), 7), Stamp::Gen(42));
        assert_eq!(read_stamp(&[0u8; 512], 7), Stamp::Zero);
        // The header's fields at the offsets this module documents.
        let b = stamped(7, 42);
        assert_eq!(&b[..8], b"KEELCRSH");
        assert_eq!(b[8..16], 7u64.to_le_bytes());
        assert_eq!(b[16..24], 42u64.to_le_bytes());
        // At another LBA (a misdirected write) or with a byte changed: damaged.
        assert!(matches!(read_stamp(&stamped(7, 42), 8), Stamp::Damaged(_)));
        let mut b = stamped(7, 42);
        b[300] ^= 1;
        assert!(matches!(read_stamp(&b, 7), Stamp::Damaged(_)));
        // Half of one version and half of another (a torn block).
        let mut t = stamped(7, 42);
        t[256..].copy_from_slice(&stamped(7, 43)[256..]);
        assert!(matches!(read_stamp(&t, 7), Stamp::Damaged(_)));
        assert!(matches!(read_stamp(&[0x5a; 512], 7), Stamp::Foreign(_)));
        assert!(matches!(read_stamp(&[0x5a; 16], 7), Stamp::Foreign(_)));
    }

    #[test]
    fn mismatch_offsets() {
        let a = vec![1u8; 100];
        let mut b = a.clone();
        b[3] = 0;
        b[50] = 0;
        b[99] = 0;
        assert_eq!(mismatches(&a, &b, 2), (3, vec![3, 50]));
        assert_eq!(mismatches(&a, &a, 8), (0, vec![]));
        assert_eq!(mismatches(&a[..90], &b, 8).0, 2 + 10);
    }

    #[test]
    fn rng_range_and_spread() {
        let mut r = Rng::new(0);
        let mut seen = [0u32; 16];
        for _ in 0..16_000 {
            let v = r.below(16);
            assert!(v < 16);
            seen[v as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
        let mut a = Rng::new(5);
        let mut b = Rng::new(5);
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(128 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999999t").is_err());
        assert_eq!(human_bytes(256 << 20), "256 MiB");
        assert_eq!(human_bytes(4096), "4 KiB");
        assert_eq!(human_bytes(1536), "1536 B");
        assert_eq!(human_bytes(512), "512 B");
    }
}
