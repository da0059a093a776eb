//! Writes the hand-made seeds of the byte-level targets into `seeds/TARGET/` (real encodings
//! made by the crates' own builders: the fuzzer starts from valid inputs and mutates them).
//! The typed targets (controller, pcie_function, mgmt_session) start from what libFuzzer finds
//! and `cargo fuzz cmin` keeps. Regenerate with
//! `cargo test --manifest-path fuzz/Cargo.toml --test write_seeds -- --ignored`, then minimise
//! (`tests/fuzz --cmin`).

use keel_fuzz::provision::{device_key, rng, sign_body, signing_key};
use keel_provision::flash::encode_config_copy;
use keel_provision::{ImageHeader, build, encode_identity, parse_toml};
use std::path::{Path, PathBuf};

fn dir(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&d).expect("creating the seed directory");
    d
}

fn put(target: &str, name: &str, data: &[u8]) {
    std::fs::write(dir(target).join(name), data).expect("writing a seed");
}

/// The README's example description with a static address and a drive slice exported to
/// emulated function 0 with AES-128-XTS: every kind of field once.
fn full(example: &str) -> String {
    let mut t = example.replace(
        "dhcp = true",
        "address = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"",
    );
    t.push_str(
        "\n[[namespace]]\nsubsystem = \"nqn.2026-11.dev.keel:vol0\"\nnsid = 7\n\
         backend = { drive = 0, nsid = 1, offset = \"512MiB\", length = \"all\" }\n\
         encryption = \"aes-128-xts\"\nfunction = 0\n",
    );
    t
}

fn nbd_stream(go: bool) -> Vec<u8> {
    const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
    let mut s = Vec::new();
    s.extend_from_slice(&3u32.to_be_bytes()); // C_FIXED_NEWSTYLE | C_NO_ZEROES
    let opt = |s: &mut Vec<u8>, o: u32, data: &[u8]| {
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&o.to_be_bytes());
        s.extend_from_slice(&(data.len() as u32).to_be_bytes());
        s.extend_from_slice(data);
    };
    opt(&mut s, 3, &[]); // LIST
    let mut info = 0u32.to_be_bytes().to_vec();
    info.extend_from_slice(&1u16.to_be_bytes());
    info.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    opt(&mut s, 6, &info); // INFO
    opt(&mut s, 0x55, &[1, 2]); // unsupported
    if go {
        opt(&mut s, 7, &info); // GO
    } else {
        opt(&mut s, 1, b"x"); // EXPORT_NAME
    }
    let req = |s: &mut Vec<u8>, flags: u16, ty: u16, handle: u64, off: u64, len: u32| {
        s.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        s.extend_from_slice(&flags.to_be_bytes());
        s.extend_from_slice(&ty.to_be_bytes());
        s.extend_from_slice(&handle.to_be_bytes());
        s.extend_from_slice(&off.to_be_bytes());
        s.extend_from_slice(&len.to_be_bytes());
    };
    req(&mut s, 1, 1, 1, 512, 1024); // WRITE FUA
    s.extend((0..1024).map(|i| i as u8));
    req(&mut s, 0, 0, 2, 0, 2048); // READ
    req(&mut s, 0, 3, 3, 0, 0); // FLUSH
    req(&mut s, 0, 4, 4, 512, 512); // TRIM
    req(&mut s, 2, 6, 5, 1024, 512); // WRITE_ZEROES, NO_HOLE
    req(&mut s, 0, 0, 6, 1 << 20, 512); // READ past the end
    req(&mut s, 0, 0, 7, 3, 512); // READ misaligned
    req(&mut s, 0, 9, 8, 0, 0); // unknown
    req(&mut s, 0, 2, 9, 0, 0); // DISC
    s
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // TOML descriptions.
    let example = std::fs::read_to_string(root.join("qemu/examples/device.toml")).expect("example");
    let full = full(&example);
    put("provision_toml", "device.toml", example.as_bytes());
    put("provision_toml", "full.toml", full.as_bytes());
    put(
        "provision_toml",
        "error.toml",
        b"[network]\ndhcp = true\naddress = \"10.0.2.15/24\"\n",
    );

    // Bundles: whole (mode 0, generation in force 0) and as a body to sign (mode 1).
    let dev = parse_toml(&full).expect("the full description parses");
    let key = signing_key();
    let bundle = build(&dev, 1, &key, &device_key(), &mut rng()).expect("builds");
    let mut whole = vec![0u8];
    whole.extend_from_slice(&bundle);
    put("provision_bundle", "whole", &whole);
    let body = &bundle[32..bundle.len() - 64];
    assert_eq!(sign_body(body, 1), bundle, "sign_body matches build");
    let mut signed = vec![1u8];
    signed.extend_from_slice(body);
    put("provision_bundle", "body", &signed);
    let ex = parse_toml(&example).expect("example parses");
    let b2 = build(&ex, 1, &key, &device_key(), &mut rng()).expect("builds");
    let mut body2 = vec![1u8];
    body2.extend_from_slice(&b2[32..b2.len() - 64]);
    put("provision_bundle", "example-body", &body2);

    // An image header and its payload.
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
    let mut h = ImageHeader {
        firmware_version: "0.1.0".into(),
        build_id: "git 1a2b3c4d".into(),
        board: "qemu-virt".into(),
        load_address: 0x4020_0000,
        payload_offset: 0,
        payload_size: 0,
        memory_size: 0x20_0000,
        sha256: [0; 32],
        signer: [0; 32],
        signature: [0; 64],
    };
    h.set_payload(&payload);
    h.sign(&key).expect("signs");
    let mut img = h.to_bytes().expect("encodes").to_vec();
    img.extend_from_slice(&payload);
    put("provision_image", "signed", &img);

    // Configuration copies (A valid, B newer; B torn) and the identity block.
    let a = encode_config_copy(3, b"bundle three").expect("copy");
    let b = encode_config_copy(4, b"bundle four").expect("copy");
    for (name, a, b) in [
        ("a3-b4", &a[..], &b[..]),
        ("a3-torn", &a[..], &b[..b.len() - 5]),
        ("erased", &[0xFF; 40][..], &[0xFF; 40][..]),
    ] {
        let mut f = (a.len() as u16).to_le_bytes().to_vec();
        f.extend_from_slice(a);
        f.extend_from_slice(b);
        put("provision_flash", name, &f);
    }
    put(
        "provision_flash",
        "identity",
        &encode_identity(&device_key()),
    );

    // NBD: a client that lists, asks for info, then enters transmission two ways.
    for (name, cfg, go) in [
        ("go-512", 0u8, true),
        ("export-name-4k-failing", 0b101, false),
    ] {
        let mut s = vec![cfg];
        s.extend_from_slice(&nbd_stream(go));
        put("nbd_server", name, &s);
    }
}
