//! Test builds only: `keel.test=<action>` on the kernel command line (`/chosen/bootargs`)
//! makes the firmware do something a test wants to observe once it is ready.
//!
//! - `exit`: power off cleanly (QEMU exits 0);
//! - `fault`: read an unmapped address (a data abort and its crash report, exit 3);
//! - `panic`: panic (exit 2);
//! - `reset`: PSCI SYSTEM_RESET (QEMU restarts the machine unless run with -no-reboot);
//! - `overflow`: unbounded recursion into the stack guard page (crash report, exit 3);
//! - `selftest`: the inline-crypto known-answer tests on this CPU, through the code the
//!   firmware uses (`keel_crypto::Xts`, `keel_nvmf_tcp::crc32c`): IEEE 1619 XTS-AES vectors 2,
//!   3 and 10, the Armv8 XTS path against the `aes` crate's, RFC 3720 B.4 CRC32C vectors with the CRC32C instructions and with the table, and
//!   the two CRC paths against each other; one line per check, then `keel: selftest PASS` (exit
//!   0) or `keel: selftest FAIL` (exit 1);
//! - `cores`: a message stream from core 0 to every secondary core and back over the SPSC
//!   rings (`crate::cores::selftest`), `keel: cores selftest PASS` (exit 0) or `FAIL` (exit 1);
//! - `core-overflow`: the last secondary core recurses into its stack guard page (crash
//!   report naming the core, exit 3).

use crate::platform::Platform;
use alloc::vec::Vec;
use keel_crypto::{KeyError, Xts, XtsKey};
use keel_hal::arch::{cpu, timer};
use keel_hal::{arch::power, println};
use keel_nvmf_tcp::crc32c;

/// Runs the action the boot arguments ask for, if any.
pub fn after_ready(platform: &Platform) {
    let action = platform
        .dt
        .bootargs
        .split_whitespace()
        .find_map(|a| a.strip_prefix("keel.test="));
    match action {
        Some("exit") => {
            println!("keel: test exit");
            power::semihosting_exit(0)
        }
        Some("fault") => {
            println!("keel: test fault");
            let p = 0xdead_0000_0000usize as *const u64;
            // SAFETY: deliberately reads an unmapped address to raise a data abort; the
            // exception handler reports it and stops the firmware.
            let v = unsafe { p.read_volatile() };
            println!("unreachable: read {v}");
        }
        Some("panic") => panic!("deliberate test panic"),
        Some("reset") => {
            println!("keel: test reset");
            power::system_reset()
        }
        Some("overflow") => {
            println!("keel: test stack overflow");
            println!("unreachable: {}", recurse(1));
        }
        Some("selftest") => {
            let pass = selftest();
            println!("keel: selftest {}", if pass { "PASS" } else { "FAIL" });
            power::semihosting_exit(if pass { 0 } else { 1 })
        }
        Some("cores") => power::semihosting_exit(if crate::cores::selftest() { 0 } else { 1 }),
        Some("core-overflow") => crate::cores::overflow_last_core(),
        Some(other) => println!("keel: unknown test action {other:?}"),
        None => {}
    }
}

#[inline(never)]
#[allow(unconditional_recursion, reason = "the point: overflow the stack")]
pub fn recurse(n: u64) -> u64 {
    let buf = core::hint::black_box([n; 64]);
    recurse(buf[3] + 1) + buf[7]
}

/// IEEE Std 1619 Annex B vector 10 (XTS-AES-256, data unit 0xff, 512 bytes 00..ff 00..ff):
/// the ciphertext, as in `firmware/crypto/tests/xts.rs`.
const VECTOR_10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

fn unhex(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let n = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            (n(p[0]) << 4) | n(p[1])
        })
        .collect()
}

/// Counts checks and failures, printing one line per check.
struct Report {
    checks: u32,
    failed: u32,
}

impl Report {
    fn check(&mut self, name: core::fmt::Arguments<'_>, ok: bool) {
        self.checks += 1;
        if !ok {
            self.failed += 1;
        }
        println!("selftest: {name}: {}", if ok { "ok" } else { "FAILED" });
    }
}

/// One XTS known-answer test: encrypt one data unit of the vector's length with its sequence
/// number, compare with the ciphertext, decrypt back.
fn xts_vector(r: &mut Report, n: u32, key: &str, dusn: u64, pt: &[u8], ct: &str) {
    let (enc_ok, dec_ok, cipher) = match XtsKey::from_hex(key) {
        Ok(k) => {
            let xts = Xts::new(&k);
            let mut data = pt.to_vec();
            xts.encrypt(&mut data, pt.len(), dusn);
            let enc_ok = data == unhex(ct);
            xts.decrypt(&mut data, pt.len(), dusn);
            (enc_ok, data == pt, k.cipher().name())
        }
        Err(_) => (false, false, "key refused"),
    };
    r.check(
        format_args!(
            "xts IEEE 1619 vector {n} ({cipher}, {}-byte data unit) encrypt",
            pt.len()
        ),
        enc_ok,
    );
    r.check(
        format_args!("xts IEEE 1619 vector {n} ({cipher}) decrypt"),
        dec_ok,
    );
}

/// xorshift64: deterministic "random-ish" test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

unsafe extern "C" {
    /// The firmware's own (`keel_hal`'s `hal/src/arch/memcpy.S`).
    fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
    /// The firmware's own (`keel_hal`'s `hal/src/arch/memcpy.S`).
    fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8;
}

/// The byte of the source pattern at `i`: a function of the index, so the checks below
/// compute what each byte must be instead of copying a reference (a copy loop the compiler
/// could turn into a `memcpy` call, checking the routine against itself).
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(131) ^ (i >> 8)) as u8
}

/// Guard bytes around a destination.
const GUARD: u8 = 0xA5;
/// Room around the destinations: offsets 0..16 and 64 guard bytes after the longest copy.
const MEM_SLACK: usize = 16 + 64;

/// Calls the firmware's `memcpy` (`copy`) or `memset` to `fill` at `dst_off` of a buffer of
/// guard bytes, and checks every byte of it: the `len` bytes written are the source's
/// (`pattern` from `src_off`) or the fill byte, the rest still guard bytes.
fn mem_case(
    dst: &mut [u8],
    src: &[u8],
    dst_off: usize,
    src_off: usize,
    len: usize,
    fill: Option<u8>,
) -> bool {
    let d = &mut dst[..dst_off + len + MEM_SLACK];
    d.fill(GUARD);
    let ret = match fill {
        // SAFETY: `d` holds `dst_off + len` bytes and more, `src` (distinct memory) holds
        // `src_off + len` bytes (the caller sizes both); byte pointers need no alignment.
        None => unsafe { memcpy(d.as_mut_ptr().add(dst_off), src.as_ptr().add(src_off), len) },
        // SAFETY: `d` holds `dst_off + len` bytes and more.
        Some(b) => unsafe { memset(d.as_mut_ptr().add(dst_off), i32::from(b), len) },
    };
    let mut ok = ret == d.as_mut_ptr().wrapping_add(dst_off);
    for (i, &got) in d.iter().enumerate() {
        let want = if (dst_off..dst_off + len).contains(&i) {
            fill.unwrap_or_else(|| pattern(src_off + i - dst_off))
        } else {
            GUARD
        };
        ok &= got == want;
    }
    ok
}

/// The firmware's `memcpy` and `memset` (q registers, overlapping ends; see
/// `hal/src/arch/memcpy.S`) against what each byte must be: every length 0..=320 at every
/// source and destination offset 0..16 (memset: every destination offset, two fill bytes),
/// then random lengths up to 70000 at random offsets. Guard bytes around the destination show
/// any byte written outside it.
fn mem_routines(r: &mut Report, rng: &mut Rng) {
    const SMALL: usize = 320;
    const LARGE: usize = 70_000;
    let src: Vec<u8> = (0..16 + LARGE).map(pattern).collect();
    let mut dst = alloc::vec![0u8; LARGE + MEM_SLACK];
    let (mut ok, mut cases) = (0u32, 0u32);
    for len in 0..=SMALL {
        for dst_off in 0..16 {
            for src_off in 0..16 {
                cases += 1;
                ok += u32::from(mem_case(&mut dst, &src, dst_off, src_off, len, None));
            }
        }
    }
    r.check(
        format_args!("memcpy: {ok}/{cases} copies of 0..={SMALL} bytes at every source and destination offset 0..16"),
        ok == cases,
    );
    let (mut ok, mut cases) = (0u32, 0u32);
    for len in 0..=SMALL {
        for dst_off in 0..16 {
            for fill in [0u8, 0xC3] {
                cases += 1;
                ok += u32::from(mem_case(&mut dst, &src, dst_off, 0, len, Some(fill)));
            }
        }
    }
    r.check(
        format_args!("memset: {ok}/{cases} fills of 0..={SMALL} bytes at every offset 0..16"),
        ok == cases,
    );
    let (mut ok, mut cases) = (0u32, 0u32);
    for i in 0..200u32 {
        let len = (rng.next() % LARGE as u64) as usize;
        let (dst_off, src_off) = ((rng.next() % 16) as usize, (rng.next() % 16) as usize);
        let fill = (i % 2 == 1).then_some(rng.next() as u8);
        cases += 1;
        ok += u32::from(mem_case(&mut dst, &src, dst_off, src_off, len, fill));
    }
    r.check(
        format_args!(
            "memcpy and memset: {ok}/{cases} random lengths below {LARGE} at random offsets"
        ),
        ok == cases,
    );
}

/// The table path, whatever the run-time switch says.
fn crc_table(data: &[u8]) -> u32 {
    !crc32c::update_sw(!0, data)
}

/// The path the firmware's digests take with the switch set to `hardware`.
fn crc_switched(hardware: bool, data: &[u8]) -> u32 {
    crc32c::set_hardware(hardware);
    crc32c::crc32c(data)
}

/// MB/s of `f` over `bytes` bytes (TCG figures: they say how QEMU emulates, not the CPU).
fn rate(bytes: usize, f: impl FnOnce()) -> u64 {
    let t0 = timer::now_ns();
    f();
    let ns = (timer::now_ns() - t0).max(1);
    (bytes as u64).saturating_mul(1000) / ns
}

fn selftest() -> bool {
    let features = cpu::Features::read();
    let mut r = Report {
        checks: 0,
        failed: 0,
    };
    let aes_hw = cfg!(target_feature = "aes") && features.aes;
    let crc_hw = cfg!(target_feature = "crc") && features.crc32;
    println!("selftest: cpu features: {features}");
    println!(
        "selftest: AES: {} (image built {} the aes target feature; ID_AA64ISAR0_EL1 AES {})",
        if aes_hw {
            "Armv8 AESE/AESD/AESMC/AESIMC instructions"
        } else {
            "not usable"
        },
        if cfg!(target_feature = "aes") {
            "with"
        } else {
            "without"
        },
        if features.pmull {
            "+ PMULL"
        } else if features.aes {
            "only"
        } else {
            "absent"
        },
    );
    println!(
        "selftest: CRC32C: {} (image built {} the crc target feature; ID_AA64ISAR0_EL1 CRC32 {}); digests use the {} path",
        if crc_hw {
            "Armv8 CRC32CB/CRC32CX instructions and the table"
        } else {
            "table only"
        },
        if cfg!(target_feature = "crc") {
            "with"
        } else {
            "without"
        },
        if features.crc32 { "present" } else { "absent" },
        if crc32c::hardware() {
            "instruction"
        } else {
            "table"
        },
    );

    // The embedded-hal delay on the generic timer waits at least what it is asked (a lower
    // bound only: the host may always make it longer).
    {
        use embedded_hal::delay::DelayNs;
        let start = timer::counter();
        timer::Delay.delay_ms(2);
        let waited = timer::ticks_to_ns(timer::counter() - start);
        r.check(
            format_args!("DelayNs::delay_ms(2) waited {waited} ns"),
            waited >= 2_000_000,
        );
    }

    // XTS-AES: the firmware serves encrypted namespaces only with the AES instructions.
    if aes_hw {
        xts_vector(
            &mut r,
            2,
            "1111111111111111111111111111111122222222222222222222222222222222",
            0x33_3333_3333,
            &[0x44; 32],
            "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
        );
        xts_vector(
            &mut r,
            3,
            "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222",
            0x33_3333_3333,
            &[0x44; 32],
            "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
        );
        let pt: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
        xts_vector(
            &mut r,
            10,
            concat!(
                "2718281828459045235360287471352662497757247093699959574966967627",
                "3141592653589793238462643383279502884197169399375105820974944592"
            ),
            0xff,
            &pt,
            VECTOR_10_CT,
        );
        r.check(
            format_args!("xts key with equal halves (IEEE 1619 vector 1) refused"),
            matches!(XtsKey::new(&[0u8; 32]), Err(KeyError::EqualHalves)),
        );
        // The firmware's own Armv8 XTS path against the `aes` crate's block functions under
        // the same XTS: both ciphers, random keys, data and sequence numbers, units of 16 to
        // 4096 bytes (whole 128-byte groups, the single-block tail, both), two units per call.
        if Xts::armv8() {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            for len in [32usize, 64] {
                let key: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let mut ok = false;
                let mut name = "key refused";
                if let Ok(k) = XtsKey::new(&key) {
                    name = k.cipher().name();
                    let (fast, slow) = (Xts::new(&k), Xts::portable(&k));
                    ok = true;
                    for unit in [16usize, 48, 128, 144, 512, 4096] {
                        let data: Vec<u8> = (0..2 * unit).map(|_| rng.next() as u8).collect();
                        let lba = rng.next();
                        let (mut a, mut b) = (data.clone(), data.clone());
                        fast.encrypt(&mut a, unit, lba);
                        slow.encrypt(&mut b, unit, lba);
                        ok &= a == b && a != data;
                        fast.decrypt(&mut a, unit, lba);
                        ok &= a == data;
                    }
                }
                r.check(
                    format_args!("xts {name}: the Armv8 path equals the aes crate's (units of 16 to 4096 bytes)"),
                    ok,
                );
            }
        }
        // Throughput of the firmware's sector path under this CPU model (TCG in QEMU).
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        if let Ok(k) = XtsKey::new(&key) {
            let xts = Xts::new(&k);
            let mut buf = alloc::vec![0x5au8; 1 << 20];
            let mbs = rate(buf.len(), || xts.encrypt(&mut buf, 4096, 0));
            println!("selftest: aes-256-xts 4 KiB sectors: {mbs} MB/s on this CPU model");
        }
    } else {
        println!(
            "selftest: xts vectors skipped: no AES instructions on this CPU (encrypted namespaces are refused)"
        );
    }

    // CRC32C: RFC 3720 B.4 and "123456789", on every path available.
    let asc: [u8; 32] = core::array::from_fn(|i| i as u8);
    let desc: [u8; 32] = core::array::from_fn(|i| 31 - i as u8);
    let vectors: [(&str, &[u8], u32); 5] = [
        ("32 bytes of 0x00", &[0u8; 32], 0x8A91_36AA),
        ("32 bytes of 0xFF", &[0xFFu8; 32], 0x62A8_AB43),
        ("32 bytes 0x00..0x1F", &asc, 0x46DD_794E),
        ("32 bytes 0x1F..0x00", &desc, 0x113F_DB5C),
        ("\"123456789\"", b"123456789", 0xE306_9283),
    ];
    let paths: &[(&str, bool)] = if crc_hw {
        &[("instructions", true), ("table", false)]
    } else {
        &[("table", false)]
    };
    for &(path, hw) in paths {
        for (name, data, want) in vectors {
            let got = crc_switched(hw, data);
            r.check(
                format_args!("crc32c ({path}) {name} = {got:#010x}, expected {want:#010x}"),
                got == want,
            );
        }
    }
    for (name, data, want) in vectors {
        let got = crc_table(data);
        r.check(
            format_args!("crc32c (update_sw) {name} = {got:#010x}"),
            got == want,
        );
    }

    // The two paths against each other on random-ish buffers: lengths 0..~9 KiB, unaligned
    // starts, streamed in uneven pieces and through copy_and_crc.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut pool = alloc::vec![0u8; 16 << 10];
    pool.iter_mut().for_each(|b| *b = rng.next() as u8);
    let (mut agree, mut cases) = (0u32, 0u32);
    for i in 0..256usize {
        let start = (rng.next() % 64) as usize;
        let len = match i {
            0..=63 => i,
            _ => (rng.next() % 9000) as usize,
        };
        let data = &pool[start..start + len];
        let table = crc_table(data);
        let cut = if len == 0 {
            0
        } else {
            (rng.next() as usize) % len
        };
        let mut ok = true;
        for &(_, hw) in paths {
            ok &= crc_switched(hw, data) == table;
            let mut s = crc32c::Crc32c::new();
            s.update(&data[..cut]);
            s.update(&data[cut..]);
            ok &= s.finish() == table;
            let mut dst = alloc::vec![0u8; len];
            let mut s = crc32c::Crc32c::new();
            ok &= crc32c::copy_and_crc(&mut dst, data, &mut s) == len;
            ok &= s.finish() == table && dst == data;
        }
        cases += 1;
        agree += u32::from(ok);
    }
    r.check(
        format_args!(
            "crc32c {} agree on {agree}/{cases} random buffers (0..9000 bytes, unaligned, streamed, copy_and_crc)",
            if crc_hw {
                "instructions and table"
            } else {
                "table paths"
            }
        ),
        agree == cases,
    );

    // Throughput under this CPU model.
    let mut buf = alloc::vec![0u8; 4 << 20];
    buf.iter_mut().for_each(|b| *b = rng.next() as u8);
    for &(path, hw) in paths {
        crc32c::set_hardware(hw);
        let mut sink = 0u32;
        let mbs = rate(buf.len(), || sink = crc32c::crc32c(&buf));
        core::hint::black_box(sink);
        println!("selftest: crc32c ({path}): {mbs} MB/s on this CPU model");
    }

    mem_routines(&mut r, &mut rng);

    // Back to what boot chose.
    crc32c::set_hardware(features.crc32);
    println!("selftest: {} check(s), {} failed", r.checks, r.failed);
    r.failed == 0 && r.checks > 0
}
