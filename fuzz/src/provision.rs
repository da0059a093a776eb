//! The provisioning formats a device or `keelctl` reads from outside: TOML device
//! descriptions, configuration bundles, image headers, flash configuration copies and the
//! identity block.
//!
//! Byte-level targets (the formats are byte strings), with the checks that make them more
//! than crash tests: a description `parse_toml` accepts is valid and survives a bundle round
//! trip; a bundle body under a valid signature only opens into a validated description whose
//! keys fit their ciphers, and re-signs to the same configuration; an accepted image header
//! re-encodes to the same bytes; the configuration copy chosen is the newest valid one, and
//! the copy the next write targets becomes the one in force once written.

use keel_provision::bundle::{BUNDLE_HEADER_LEN, BUNDLE_MAGIC, BUNDLE_VERSION};
use keel_provision::ed25519_dalek::{Signer, SigningKey};
use keel_provision::flash::{
    self, CONFIG_HEADER_LEN, ConfigCopy, encode_config_copy, parse_config_copy,
};
use keel_provision::{
    DeviceKey, ImageHeader, build, build_with_keys, diff, encode_identity, inspect, parse_identity,
    parse_toml, validate, verify_and_open,
};

/// The provisioning key of the harness (a fixed test key).
pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// The device key of the harness.
pub fn device_key() -> DeviceKey {
    DeviceKey::from_bytes([9; 32])
}

/// Deterministic "random" bytes (the harness must be reproducible).
pub fn rng() -> impl FnMut(&mut [u8]) {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    move |buf: &mut [u8]| {
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

/// A TOML device description.
pub fn toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dev = match parse_toml(text) {
        Ok(d) => d,
        Err(e) => {
            // The error names a line inside the text.
            let _ = e.to_string();
            assert!(
                e.line <= text.lines().count() + 1,
                "error beyond the text: {e:?}"
            );
            return;
        }
    };
    validate(&dev).expect("parse_toml returned a description that does not validate");
    let same = diff(&dev, &dev);
    assert!(
        same.added.is_empty()
            && same.removed.is_empty()
            && same.needs_reboot.is_empty()
            && same.subsystems_added.is_empty()
            && same.subsystems_removed.is_empty(),
        "a description differs from itself: {same:?}"
    );
    assert_eq!(same.kept.len(), dev.namespaces.len());
    let key = signing_key();
    let dk = device_key();
    let bundle = build(&dev, 1, &key, &dk, &mut rng()).expect("a valid description builds");
    let cfg = verify_and_open(&bundle, &key.verifying_key(), &dk, 0).expect("its bundle opens");
    assert_eq!(cfg.device, dev, "the bundle does not carry the description");
    for (ns, k) in dev.namespaces.iter().zip(&cfg.keys) {
        assert_eq!(k.as_ref().map_or(0, |k| k.len()), ns.encryption.key_len());
    }
    // With NGUIDs for the namespaces functions export (keelctl provision build): they travel
    // in their section and come back as they went; a rebuild from the previous description
    // keeps every one.
    let mut with = dev.clone();
    keel_provision::assign_nguids(&mut with, None, &mut rng());
    let bundle = build(&with, 2, &key, &dk, &mut rng()).expect("NGUIDs keep it valid");
    let cfg = verify_and_open(&bundle, &key.verifying_key(), &dk, 0).expect("its bundle opens");
    assert_eq!(cfg.device, with, "the bundle does not carry the NGUIDs");
    let mut again = dev.clone();
    keel_provision::assign_nguids(&mut again, Some(&with), &mut |b: &mut [u8]| b.fill(0x5a));
    assert_eq!(again.nguids, with.nguids, "NGUIDs not kept from the previous description");
}

/// Signs `body` as a bundle of `generation` with the harness key.
pub fn sign_body(body: &[u8], generation: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BUNDLE_HEADER_LEN + body.len() + 64);
    b.extend_from_slice(&BUNDLE_MAGIC);
    b.extend_from_slice(&BUNDLE_VERSION.to_le_bytes());
    b.extend_from_slice(&(BUNDLE_HEADER_LEN as u16).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(body);
    let sig = signing_key().sign(&b);
    b.extend_from_slice(&sig.to_bytes());
    b
}

/// A configuration bundle. First byte: bit 0 set = the rest is a bundle *body*, signed here
/// (reaches body decoding, validation and key unwrapping, which a forger with a stolen
/// signature would reach); clear = the rest is a whole bundle. Bits 1-7: the generation in
/// force on the device.
pub fn bundle(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let current = (mode >> 1) as u64;
    let signed;
    let bytes = if mode & 1 == 1 {
        signed = sign_body(rest, current + 1);
        &signed[..]
    } else {
        rest
    };
    let _ = inspect(bytes);
    let key = signing_key();
    let dk = device_key();
    let Ok(cfg) = verify_and_open(bytes, &key.verifying_key(), &dk, current) else {
        return;
    };
    assert!(cfg.generation > current, "rollback accepted");
    validate(&cfg.device).expect("an opened bundle's description does not validate");
    assert_eq!(cfg.keys.len(), cfg.device.namespaces.len());
    for (ns, k) in cfg.device.namespaces.iter().zip(&cfg.keys) {
        assert_eq!(
            k.as_ref().map_or(0, |k| k.len()),
            ns.encryption.key_len(),
            "a data key does not fit its cipher"
        );
    }
    let again = build_with_keys(
        &cfg.device,
        cfg.generation,
        &key,
        &dk,
        &cfg.keys,
        &mut rng(),
    )
    .expect("an opened configuration re-signs");
    let back = verify_and_open(&again, &key.verifying_key(), &dk, current).expect("re-opens");
    assert_eq!(back.device, cfg.device);
    assert_eq!(back.keys, cfg.keys);
}

/// An image header followed by its payload.
pub fn image(data: &[u8]) {
    let h = match ImageHeader::parse(data) {
        Ok(h) => h,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let bytes = h.to_bytes().expect("an accepted header re-encodes");
    assert_eq!(
        &bytes[..],
        &data[..bytes.len()],
        "header does not re-encode to itself"
    );
    let payload = &data[bytes.len()..];
    let trusted = signing_key().verifying_key();
    let open = h.verify(payload, None);
    let anchored = h.verify(payload, Some(&trusted));
    // Trusting a key can only refuse more.
    if anchored.is_ok() {
        assert!(open.is_ok());
    }
}

/// The configuration area and the identity block as read from flash: two bytes give the
/// length of copy A's region, then copy A, copy B; the identity block is tried on the input
/// itself.
pub fn flash(data: &[u8]) {
    if let Ok(k) = parse_identity(data) {
        assert_eq!(
            &encode_identity(&k)[..],
            &data[..64],
            "an accepted identity block does not re-encode to itself"
        );
    }
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (a, b) = rest.split_at(n);
    let (ea, eb) = (parse_config_copy(a), parse_config_copy(b));
    let chosen = flash::chosen_config(a, b);
    match chosen {
        None => assert!(ea.is_none() && eb.is_none(), "a valid copy was not chosen"),
        Some((ConfigCopy::A, e)) => {
            assert_eq!(Some(e), ea);
            assert!(
                eb.is_none_or(|b| b.sequence <= e.sequence),
                "an older copy chosen"
            );
        }
        Some((ConfigCopy::B, e)) => {
            assert_eq!(Some(e), eb);
            assert!(
                ea.is_none_or(|a| a.sequence < e.sequence),
                "an older copy chosen"
            );
        }
    }
    for e in [ea, eb].into_iter().flatten() {
        let enc = encode_config_copy(e.sequence, e.payload).expect("a parsed copy fits");
        assert_eq!(parse_config_copy(&enc), Some(e), "copy does not round-trip");
        assert_eq!(enc.len(), CONFIG_HEADER_LEN + e.payload.len());
    }
    // Writing the next configuration where `next_config_write` says makes it the one in force,
    // and never overwrites the copy in force.
    let next = flash::next_config_write(a, b);
    if let Some((copy, _)) = chosen {
        assert_ne!(
            next.copy, copy,
            "the next write overwrites the copy in force"
        );
    }
    let new = encode_config_copy(next.sequence, b"new").expect("small payload");
    let (na, nb) = match next.copy {
        ConfigCopy::A => (&new[..], b),
        ConfigCopy::B => (a, &new[..]),
    };
    let now = flash::chosen_config(na, nb).map(|(c, e)| (c, e.payload));
    assert_eq!(
        now,
        Some((next.copy, &b"new"[..])),
        "the configuration just written is not the one in force (sequence {})",
        next.sequence
    );
}
