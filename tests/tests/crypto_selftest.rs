//! The inline-crypto known-answer tests on the target (`keel.test=selftest`, test build): the
//! IEEE 1619 XTS-AES vectors through `keel_crypto::Xts` and the RFC 3720 CRC32C vectors
//! through `keel_nvmf_tcp::crc32c`, with the Armv8 instructions the image is built for (and
//! keel-crypto's own Armv8 XTS path against the `aes` crate's), on
//! QEMU's `max` CPU and on a Cortex-A72 model.

use keel_tests::{BOOT_TIMEOUT, Build, Qemu};

/// Boots the selftest on this CPU model (None: qemu/run's default, `max`); returns the console.
fn selftest(cpu: Option<&str>) -> String {
    let mut args = vec!["--append", "keel.test=selftest"];
    if let Some(cpu) = cpu {
        args.extend(["--cpu", cpu]);
    }
    let mut q = Qemu::boot(Build::Test, &args);
    q.wait_for("keel: selftest", BOOT_TIMEOUT * 2)
        .unwrap_or_else(|e| panic!("{e}"));
    let code = q.wait_exit(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let c = q.console();
    assert!(c.contains("keel: selftest PASS"), "{c}");
    assert!(!c.contains("FAILED"), "{c}");
    assert_eq!(code, 0, "{c}");
    c
}

/// The checks every CPU with the Cryptography Extension and CRC32 must pass.
fn assert_checks(c: &str) {
    // The firmware's memcpy and memset (hal/src/arch/memcpy.S) against the bytes each must
    // produce: all short lengths and offsets, then random long ones.
    for prefix in [
        "selftest: memcpy: ",
        "selftest: memset: ",
        "selftest: memcpy and memset: ",
    ] {
        let line = c
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{c}"));
        assert!(line.ends_with(": ok"), "{line}");
    }
    for n in [2, 3, 10] {
        for dir in ["encrypt", "decrypt"] {
            let line = c
                .lines()
                .find(|l| {
                    l.starts_with(&format!("selftest: xts IEEE 1619 vector {n} "))
                        && l.contains(dir)
                })
                .unwrap_or_else(|| panic!("no vector {n} {dir} line:\n{c}"));
            assert!(line.ends_with(": ok"), "{line}");
        }
    }
    assert!(
        c.contains("selftest: xts key with equal halves (IEEE 1619 vector 1) refused: ok"),
        "{c}"
    );
    for path in ["instructions", "table"] {
        for (name, crc) in [
            ("32 bytes of 0x00", "0x8a9136aa"),
            ("32 bytes of 0xFF", "0x62a8ab43"),
            ("32 bytes 0x00..0x1F", "0x46dd794e"),
            ("\"123456789\"", "0xe3069283"),
        ] {
            let want = format!("selftest: crc32c ({path}) {name} = {crc}, expected {crc}: ok");
            assert!(c.contains(&want), "no {want:?} in:\n{c}");
        }
    }
    assert!(
        c.contains("selftest: crc32c instructions and table agree on 256/256 random buffers"),
        "{c}"
    );
    // The hardware paths were the ones exercised.
    assert!(
        c.contains("selftest: AES: Armv8 AESE/AESD/AESMC/AESIMC instructions"),
        "{c}"
    );
    assert!(
        c.contains("selftest: CRC32C: Armv8 CRC32CB/CRC32CX instructions and the table"),
        "{c}"
    );
    assert!(c.contains("digests use the instruction path"), "{c}");
    // The firmware's Armv8 XTS path (keel_crypto's own, not the `aes` crate's) agrees with the
    // `aes` crate's block functions under the same XTS.
    for cipher in ["aes-128-xts", "aes-256-xts"] {
        let want = format!(
            "selftest: xts {cipher}: the Armv8 path equals the aes crate's (units of 16 to 4096 bytes): ok"
        );
        assert!(c.contains(&want), "no {want:?} in:\n{c}");
    }
    assert!(c.contains("selftest: 29 check(s), 0 failed"), "{c}");
}

#[test]
fn selftest_passes_on_cpu_max() {
    let c = selftest(None);
    assert_checks(&c);
    assert!(c.contains("cpu features: aes pmull"), "{c}");
}

#[test]
fn selftest_passes_on_cortex_a72() {
    let c = selftest(Some("cortex-a72"));
    assert_checks(&c);
    // Part 0xd08: a Cortex-A72 (Armv8.0-A with the Cryptography Extension and CRC32).
    assert!(c.contains("implementer 0x41, part 0xd08"), "{c}");
}
