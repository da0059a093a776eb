//! Host throughput of the inline-crypto data path (a plain timing loop, not a test):
//! AES-XTS through `keel_crypto::Xts` over 4 KiB calls (the granularity of
//! `openssl speed -evp aes-256-xts -bytes 4096`), with 4096- and 512-byte data units, and
//! CRC32C through `keel_nvmf_tcp::crc32c` (the table path: the Armv8 instructions exist only on
//! the target) beside the `crc32c` crate (SSE4.2 on x86_64, the CRC32 instructions on aarch64).
//!
//! ```sh
//! cargo bench -p keel-crypto --bench throughput            # 2 s per line
//! cargo bench -p keel-crypto --bench throughput -- 5       # 5 s per line
//! openssl speed -evp aes-256-xts -bytes 4096 -seconds 3    # the reference, same machine
//! ```

use keel_crypto::{Xts, XtsKey};
use keel_nvmf_tcp::crc32c as keel_crc;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Runs `f` (which processes `bytes` bytes per call) for about `secs`; returns GB/s (10^9).
fn gbps(bytes: usize, secs: f64, mut f: impl FnMut()) -> f64 {
    // Warm up (caches, key schedule, frequency).
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        f();
    }
    let budget = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        for _ in 0..64 {
            f();
        }
        calls += 64;
    }
    (calls as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let secs: f64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2.0);

    #[cfg(target_arch = "x86_64")]
    println!(
        "host: x86_64, AES-NI {}, PCLMULQDQ {}, SSE4.2 {} (run-time detection)",
        std::is_x86_feature_detected!("aes"),
        std::is_x86_feature_detected!("pclmulqdq"),
        std::is_x86_feature_detected!("sse4.2"),
    );
    #[cfg(target_arch = "aarch64")]
    println!(
        "host: aarch64, AES {}, CRC32 {} (run-time detection)",
        std::arch::is_aarch64_feature_detected!("aes"),
        std::arch::is_aarch64_feature_detected!("crc"),
    );
    println!("{secs} s per measurement; GB/s = 10^9 bytes per second\n");

    // AES-XTS: one 4 KiB buffer per call, in place, advancing LBAs (a new tweak per unit).
    println!(
        "{:<44} {:>10}",
        "AES-XTS (keel_crypto::Xts), 4096-byte calls", "GB/s"
    );
    let key256: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(1))
        .collect();
    let key128: Vec<u8> = key256[..32].to_vec();
    for (name, key) in [("aes-256-xts", &key256), ("aes-128-xts", &key128)] {
        let xts = Xts::new(&XtsKey::new(key).expect("valid key"));
        for unit in [4096usize, 512] {
            let mut buf = vec![0x5au8; 4096];
            let mut lba = 0u64;
            let enc = gbps(buf.len(), secs, || {
                xts.encrypt(black_box(&mut buf), unit, lba);
                lba = lba.wrapping_add((4096 / unit) as u64);
            });
            let dec = gbps(buf.len(), secs, || {
                xts.decrypt(black_box(&mut buf), unit, lba);
                lba = lba.wrapping_add((4096 / unit) as u64);
            });
            println!("  {name} {unit:>4}-byte data unit   encrypt {enc:>7.3}   decrypt {dec:>7.3}");
        }
    }

    // CRC32C over digest-sized pieces: a 4 KiB data PDU and a 128 KiB (MAXH2CDATA) one.
    println!("\n{:<44} {:>10}", "CRC32C", "GB/s");
    let data: Vec<u8> = (0..128 << 10)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    assert_eq!(keel_crc::crc32c(&data), crc32c::crc32c(&data));
    assert_eq!(!keel_crc::update_sw(!0, &data), crc32c::crc32c(&data));
    for len in [4096usize, 128 << 10] {
        let piece = &data[..len];
        let table = gbps(len, secs, || {
            black_box(keel_crc::update_sw(!0, black_box(piece)));
        });
        let mut dst = vec![0u8; len];
        let copy = gbps(len, secs, || {
            let mut s = keel_crc::Crc32c::new();
            keel_crc::copy_and_crc(black_box(&mut dst), black_box(piece), &mut s);
            black_box(s.finish());
        });
        let krate = gbps(len, secs, || {
            black_box(crc32c::crc32c(black_box(piece)));
        });
        println!(
            "  {:>6} B: keel table {table:>7.3}   keel copy_and_crc (table) {copy:>7.3}   crc32c crate {krate:>7.3}",
            len
        );
    }
    println!(
        "\n(keel_nvmf_tcp::crc32c uses the Armv8 CRC32CX instructions only on aarch64 builds \
         with +crc, i.e. on the target: the x86 host measures its table path.)"
    );
}
