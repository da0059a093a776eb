//! Bundles: round trips, and every kind of bad bundle refused (tampered anywhere, truncated,
//! unsigned, wrong provisioning key, wrong device key, rollback).

use keel_provision::bundle::{BUNDLE_HEADER_LEN, SIGNATURE_LEN};
use keel_provision::ed25519_dalek::{Signer, SigningKey};
use keel_provision::{
    Backend, BundleError, Device, DeviceKey, Encryption, Management, Namespace, Network, Subsystem,
    assign_nguids, build, build_with_keys, inspect, verify_and_open,
};
use proptest::prelude::*;

const NQN: &str = "nqn.2026-11.dev.keel:vol0";

/// A deterministic generator for tests (the host uses the OS generator).
fn rng(seed: u64) -> impl FnMut(&mut [u8]) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move |buf: &mut [u8]| {
        for b in buf {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = s as u8;
        }
    }
}

fn device() -> Device {
    Device {
        network: Network::Dhcp,
        subsystems: vec![Subsystem {
            nqn: NQN.into(),
            serial: Some("KEEL0001".into()),
            model: None,
            allowed_hosts: vec![],
        }],
        namespaces: vec![
            Namespace {
                subsystem: NQN.into(),
                nsid: 1,
                backend: Backend::Drive {
                    drive: 0,
                    nsid: 1,
                    offset: 0,
                    length: Some(512 << 20),
                },
                encryption: Encryption::Aes256Xts,
                function: None,
            },
            Namespace {
                subsystem: NQN.into(),
                nsid: 2,
                backend: Backend::Ram {
                    size: 256 << 20,
                    block_size: 512,
                },
                encryption: Encryption::None,
                function: Some(0),
            },
            Namespace {
                subsystem: NQN.into(),
                nsid: 3,
                backend: Backend::Drive {
                    drive: 0,
                    nsid: 1,
                    offset: 512 << 20,
                    length: None,
                },
                encryption: Encryption::Aes128Xts,
                function: None,
            },
        ],
        management: Some(Management {
            port: 9000,
            authorized_key: SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes(),
        }),
        qos: Default::default(),
        nguids: vec![],
    }
}

struct Keys {
    signing: SigningKey,
    device: DeviceKey,
}

fn keys() -> Keys {
    Keys {
        signing: SigningKey::from_bytes(&[1; 32]),
        device: DeviceKey::from_bytes([2; 32]),
    }
}

fn bundle(generation: u64) -> Vec<u8> {
    let k = keys();
    build(
        &device(),
        generation,
        &k.signing,
        &k.device,
        &mut rng(generation),
    )
    .unwrap()
}

#[test]
fn round_trip() {
    let k = keys();
    let b = bundle(5);
    assert_eq!(inspect(&b).unwrap().generation, 5);
    let c = verify_and_open(&b, &k.signing.verifying_key(), &k.device, 4).unwrap();
    assert_eq!(c.generation, 5);
    assert_eq!(c.device, device());
    let lens: Vec<_> = c.keys.iter().map(|k| k.as_ref().map(|k| k.len())).collect();
    assert_eq!(lens, [Some(64), None, Some(32)]);
    let k0 = c.keys[0].as_ref().unwrap().expose_secret();
    assert_ne!(k0[..32], k0[32..], "XTS halves differ");
    // Data keys never appear in clear in the bundle.
    assert!(!b.windows(32).any(|w| w == &k0[..32]));
    // Re-signing with the same keys keeps them.
    let b2 = build_with_keys(&c.device, 6, &k.signing, &k.device, &c.keys, &mut rng(9)).unwrap();
    let c2 = verify_and_open(&b2, &k.signing.verifying_key(), &k.device, 5).unwrap();
    assert_eq!(c2.keys, c.keys);
    // Debug output of an opened configuration shows no key bytes.
    let dbg = format!("{c:?}");
    assert!(dbg.contains("redacted"), "{dbg}");
}

#[test]
fn fresh_keys_per_build() {
    let k = keys();
    let open = |b: &[u8]| verify_and_open(b, &k.signing.verifying_key(), &k.device, 0).unwrap();
    let (a, b) = (open(&bundle(1)), open(&bundle(2)));
    assert_ne!(a.keys[0], b.keys[0]);
}

#[test]
fn rollback_is_refused() {
    let k = keys();
    let b = bundle(10);
    let pk = k.signing.verifying_key();
    for current in [10, 11, u64::MAX] {
        assert_eq!(
            verify_and_open(&b, &pk, &k.device, current).unwrap_err(),
            BundleError::Rollback {
                generation: 10,
                current
            }
        );
    }
    assert!(verify_and_open(&b, &pk, &k.device, 9).is_ok());
    assert!(build(&device(), 0, &k.signing, &k.device, &mut rng(0)).is_err());
}

#[test]
fn wrong_keys_are_refused() {
    let k = keys();
    let b = bundle(3);
    let other = SigningKey::from_bytes(&[9; 32]).verifying_key();
    assert_eq!(
        verify_and_open(&b, &other, &k.device, 0).unwrap_err(),
        BundleError::BadSignature
    );
    let e = verify_and_open(
        &b,
        &k.signing.verifying_key(),
        &DeviceKey::from_bytes([7; 32]),
        0,
    )
    .unwrap_err();
    assert_eq!(e, BundleError::KeyUnwrap { namespace: 0 });
    assert!(e.to_string().contains("another device"), "{e}");
}

#[test]
fn unsigned_truncated_and_foreign_bundles_are_refused() {
    let k = keys();
    let pk = k.signing.verifying_key();
    let b = bundle(3);
    let mut unsigned = b.clone();
    let n = unsigned.len();
    unsigned[n - SIGNATURE_LEN..].fill(0);
    assert_eq!(
        verify_and_open(&unsigned, &pk, &k.device, 0).unwrap_err(),
        BundleError::Unsigned
    );
    for len in [
        0,
        7,
        8,
        31,
        32,
        33,
        BUNDLE_HEADER_LEN + 10,
        n - SIGNATURE_LEN,
        n - 1,
    ] {
        match verify_and_open(&b[..len], &pk, &k.device, 0).unwrap_err() {
            BundleError::Truncated { .. } => {}
            e => panic!("{len} bytes: {e}"),
        }
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(matches!(
        verify_and_open(&longer, &pk, &k.device, 0),
        Err(BundleError::TrailingData { .. })
    ));
    assert_eq!(
        verify_and_open(
            b"\x7fELF\x02\x01\x01\0 and so on, long enough",
            &pk,
            &k.device,
            0
        )
        .unwrap_err(),
        BundleError::BadMagic
    );
    let mut v2 = b.clone();
    v2[8] = 2;
    assert_eq!(
        verify_and_open(&v2, &pk, &k.device, 0).unwrap_err(),
        BundleError::UnsupportedVersion(2)
    );
}

#[test]
fn signed_but_malformed_bodies_are_refused() {
    // A correctly signed bundle whose body is garbage: the signature holds, decoding fails.
    let k = keys();
    let body = [0xffu8; 40];
    let mut b = Vec::new();
    b.extend_from_slice(b"KEELBNDL");
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&body);
    let sig = k.signing.sign(&b);
    b.extend_from_slice(&sig.to_bytes());
    assert!(matches!(
        verify_and_open(&b, &k.signing.verifying_key(), &k.device, 0),
        Err(BundleError::Malformed(_))
    ));
}

#[test]
fn invalid_descriptions_are_not_built() {
    let k = keys();
    let mut d = device();
    d.namespaces[1].subsystem = "nqn.2026-11.dev.keel:nope".into();
    match build(&d, 1, &k.signing, &k.device, &mut rng(1)) {
        Err(BundleError::Invalid(e)) => assert_eq!(e.path, "namespace[1].subsystem"),
        r => panic!("{r:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// One flipped bit anywhere (header, body, wrapped keys, signature) never verifies.
    #[test]
    fn any_bit_flip_is_refused(pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let k = keys();
        let mut b = bundle(42);
        let i = pos.index(b.len());
        b[i] ^= 1 << bit;
        prop_assert!(verify_and_open(&b, &k.signing.verifying_key(), &k.device, 0).is_err());
    }

    /// Any truncation is refused.
    #[test]
    fn any_truncation_is_refused(pos in any::<prop::sample::Index>()) {
        let k = keys();
        let b = bundle(42);
        let len = pos.index(b.len());
        prop_assert!(verify_and_open(&b[..len], &k.signing.verifying_key(), &k.device, 0).is_err());
    }
}

/// The NGUID section's bytes as the crate documentation's table gives them ("Bundle",
/// trailing sections): after the first-format body, the QoS section (no rules: four empty
/// lists, `00 00 00 00`), then `NGU1`, the count, and per namespace its index and 16 bytes.
#[test]
fn nguid_section_layout_follows_the_documented_table() {
    let k = keys();
    let plain = device();
    let mut d = device();
    d.nguids = vec![(1, [0xA5; 16])];
    let a = build(&plain, 9, &k.signing, &k.device, &mut rng(1)).unwrap();
    let b = build(&d, 9, &k.signing, &k.device, &mut rng(1)).unwrap();
    let body = |x: &[u8]| x[BUNDLE_HEADER_LEN..x.len() - SIGNATURE_LEN].to_vec();
    let (a, b) = (body(&a), body(&b));
    let mut want = Vec::new();
    want.extend_from_slice(&[0, 0, 0, 0]); // QoS: namespaces, groups, hosts, functions
    want.extend_from_slice(&[0x4E, 0x47, 0x55, 0x31]); // "NGU1"
    want.push(1); // one entry
    want.push(1); // namespace index 1
    want.extend_from_slice(&[0xA5; 16]);
    assert_eq!(b.len(), a.len() + want.len());
    assert_eq!(&b[a.len()..], &want[..]);
    // The first-format part is the same (the wrapped keys' nonces come from the same rng).
    assert_eq!(&b[..a.len()], &a[..]);
}

#[test]
fn nguids_round_trip_and_a_bundle_without_them_still_opens() {
    let k = keys();
    let mut d = device();
    assign_nguids(&mut d, None, &mut rng(5));
    // Only the namespaces of subsystems a function exports (NSID 2 names function 0, so all
    // three of its subsystem's namespaces).
    assert_eq!(d.nguids.len(), 3);
    let b = build(&d, 2, &k.signing, &k.device, &mut rng(2)).unwrap();
    let c = verify_and_open(&b, &k.signing.verifying_key(), &k.device, 0).unwrap();
    assert_eq!(c.device.nguids, d.nguids);
    let old = build(&device(), 2, &k.signing, &k.device, &mut rng(2)).unwrap();
    let c = verify_and_open(&old, &k.signing.verifying_key(), &k.device, 0).unwrap();
    assert!(c.device.nguids.is_empty());
}

#[test]
fn nguids_are_kept_for_the_same_namespace_and_new_for_any_other() {
    let mut old = device();
    assign_nguids(&mut old, None, &mut rng(5));
    let mut new = device();
    // NSID 3 gets another backend: a new namespace to the host, a new NGUID.
    new.namespaces[2].backend = Backend::Ram {
        size: 1 << 20,
        block_size: 512,
    };
    assign_nguids(&mut new, Some(&old), &mut rng(6));
    assert_eq!(new.nguid(0), old.nguid(0));
    assert_eq!(new.nguid(1), old.nguid(1));
    assert_ne!(new.nguid(2), old.nguid(2));
    // Without the previous bundle every NGUID is drawn anew.
    let mut fresh = device();
    assign_nguids(&mut fresh, None, &mut rng(7));
    for i in 0..3 {
        assert_ne!(fresh.nguid(i), old.nguid(i));
    }
    // No function: derived NGUIDs (none in the description).
    let mut plain = device();
    plain.namespaces[1].function = None;
    assign_nguids(&mut plain, None, &mut rng(8));
    assert!(plain.nguids.is_empty());
}

#[test]
fn bad_nguid_entries_are_refused() {
    let k = keys();
    for (nguids, why) in [
        (vec![(7, [1; 16])], "names no namespace"),
        (vec![(0, [0; 16])], "all zero"),
        (vec![(0, [1; 16]), (0, [2; 16])], "given twice"),
        (vec![(0, [1; 16]), (1, [1; 16])], "same NGUID"),
    ] {
        let d = Device { nguids, ..device() };
        match build(&d, 2, &k.signing, &k.device, &mut rng(2)) {
            Err(BundleError::Invalid(e)) => assert!(e.message.contains(why), "{e}"),
            other => panic!("{why}: {other:?}"),
        }
    }
}
