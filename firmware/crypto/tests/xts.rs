//! XTS-AES against IEEE Std 1619 test vectors (Annex B, vectors 2, 3 and 10; vector 1 uses
//! equal key halves, which this crate refuses), and the encrypting backend against a plain one.

use keel_crypto::{Cipher, EncryptedBackend, KeyError, Xts, XtsKey};
use keel_storage::{
    BlockBackend, BlockCompletion, BlockOp, BlockRequest, IoBuf, RamBackend, RejectReason,
};
use proptest::prelude::*;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn check(key: &str, dusn: u64, pt: &[u8], ct: &str) {
    let key = XtsKey::new(&unhex(key)).unwrap();
    let xts = Xts::new(&key);
    let mut data = pt.to_vec();
    // One data unit of the vector's length, whose sequence number is the vector's.
    xts.encrypt(&mut data, pt.len(), dusn);
    assert_eq!(data, unhex(ct));
    xts.decrypt(&mut data, pt.len(), dusn);
    assert_eq!(data, pt);
}

#[test]
fn ieee_1619_vector_2() {
    check(
        "1111111111111111111111111111111122222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0",
    );
}

#[test]
fn ieee_1619_vector_3() {
    check(
        "fffefdfcfbfaf9f8f7f6f5f4f3f2f1f022222222222222222222222222222222",
        0x33_3333_3333,
        &[0x44; 32],
        "af85336b597afc1a900b2eb21ec949d292df4c047e0b21532186a5971a227a89",
    );
}

/// XTS-AES-256, a 512-byte data unit with sequence number 0xff.
const VECTOR_10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

#[test]
fn ieee_1619_vector_10_aes256_512_byte_unit() {
    let pt: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    check(
        concat!(
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592"
        ),
        0xff,
        &pt,
        VECTOR_10_CT,
    );
}

#[test]
fn blocks_use_their_lba_as_tweak() {
    // Encrypting two blocks at LBA 7 equals encrypting each alone at LBA 7 and 8.
    let key = XtsKey::new(&(0..64u8).collect::<Vec<_>>()).unwrap();
    let xts = Xts::new(&key);
    let pt: Vec<u8> = (0..1024u32).map(|i| (i * 31) as u8).collect();
    let mut both = pt.clone();
    xts.encrypt(&mut both, 512, 7);
    let (mut a, mut b) = (pt[..512].to_vec(), pt[512..].to_vec());
    xts.encrypt(&mut a, 512, 7);
    xts.encrypt(&mut b, 512, 8);
    assert_eq!(both, [a, b].concat());
    // The same plaintext in two blocks gives different ciphertext.
    let mut same = [0x55u8; 1024];
    xts.encrypt(&mut same, 512, 0);
    assert_ne!(same[..512], same[512..]);
}

#[test]
fn keys_are_checked_and_never_printed() {
    assert_eq!(XtsKey::new(&[1; 48]).unwrap_err(), KeyError::Length(48));
    assert_eq!(XtsKey::new(&[9; 64]).unwrap_err(), KeyError::EqualHalves);
    assert_eq!(XtsKey::new(&[9; 32]).unwrap_err(), KeyError::EqualHalves);
    let hex = "00112233445566778899aabbccddeeff0123456789abcdef0123456789abcdef";
    let k = XtsKey::from_hex(hex).unwrap();
    assert_eq!(k.cipher(), Cipher::Aes128Xts);
    let shown = format!("{k:?} {:?}", Xts::new(&k));
    assert!(
        shown.contains("<redacted>") && !shown.contains("0011") && !shown.contains("00112233"),
        "{shown}"
    );
    assert!(XtsKey::from_hex("zz").is_err());
    assert_eq!(Cipher::from_name("aes-256-xts"), Some(Cipher::Aes256Xts));
}

fn key() -> XtsKey {
    XtsKey::new(&(0..64u8).map(|i| i.wrapping_mul(37)).collect::<Vec<_>>()).unwrap()
}

fn run(
    b: &mut dyn BlockBackend,
    op: BlockOp,
    lba: u64,
    data: Option<Vec<u8>>,
) -> (Result<(), keel_storage::BlockError>, Option<Vec<u8>>) {
    let bs = b.geometry().block_size as usize;
    let blocks = data.as_ref().map_or(1, |d| d.len() / bs) as u32;
    let buf = data.map(|d| {
        let mut io = IoBuf::leak_zeroed(d.len());
        io.as_mut_slice().copy_from_slice(&d);
        io
    });
    b.submit(BlockRequest {
        tag: 77,
        op,
        lba,
        blocks,
        buf,
        buf_offset: 0,
    })
    .unwrap();
    let mut out = None;
    while out.is_none() {
        b.poll(&mut |c: BlockCompletion| out = Some(c));
    }
    let c = out.unwrap();
    assert_eq!(c.tag, 77);
    (c.result, c.buf.map(|b| b.as_slice().to_vec()))
}

#[test]
fn data_at_rest_is_ciphertext_and_reads_back_as_written() {
    let ram = RamBackend::new(512, 64, 8).unwrap();
    let mut enc = EncryptedBackend::new(ram, &key(), 8);
    let pattern: Vec<u8> = b"KEEL-PATTERN-"
        .iter()
        .copied()
        .cycle()
        .take(2048)
        .collect();
    let (r, _) = run(
        &mut enc,
        BlockOp::Write { fua: false },
        4,
        Some(pattern.clone()),
    );
    r.unwrap();
    let media = enc.inner().contents();
    assert!(
        !media.windows(12).any(|w| w == b"KEEL-PATTERN"),
        "plaintext reached the medium"
    );
    let (r, back) = run(&mut enc, BlockOp::Read, 4, Some(vec![0; 2048]));
    r.unwrap();
    assert_eq!(back.unwrap(), pattern);
    // Compare with the right plaintext succeeds, with other data fails.
    assert!(
        run(&mut enc, BlockOp::Compare, 4, Some(pattern.clone()))
            .0
            .is_ok()
    );
    assert!(
        run(&mut enc, BlockOp::Compare, 4, Some(vec![0; 2048]))
            .0
            .is_err()
    );
    // The same medium read with another key is noise, not the pattern.
    let ram = RamBackend::new(512, 64, 8).unwrap();
    let mut other = EncryptedBackend::new(
        ram,
        &XtsKey::new(
            &[3u8; 32]
                .iter()
                .chain(&[4u8; 32])
                .copied()
                .collect::<Vec<_>>(),
        )
        .unwrap(),
        8,
    );
    let (r, _) = run(
        &mut other,
        BlockOp::Write { fua: false },
        4,
        Some(pattern.clone()),
    );
    r.unwrap();
    assert_ne!(
        other.inner().contents()[2048..4096],
        enc.inner().contents()[2048..4096]
    );
    assert!(!enc.capabilities().write_zeroes);
}

#[test]
fn reads_move_now_decrypted_and_writes_take_a_buffer() {
    let ram = RamBackend::new(512, 64, 8).unwrap();
    let mut enc = EncryptedBackend::new(ram, &key(), 8);
    assert_eq!(
        enc.moves_data_now(),
        keel_storage::NowIo {
            read: true,
            write: false
        }
    );
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    let (r, _) = run(
        &mut enc,
        BlockOp::Write { fua: false },
        9,
        Some(pattern.clone()),
    );
    r.unwrap();
    // The synchronous read returns the plaintext the buffered read returns.
    let mut now = vec![0u8; 4096];
    enc.read_now(9, 8, &mut now).unwrap();
    assert_eq!(now, pattern);
    let mut part = vec![0u8; 1024];
    enc.read_now(11, 2, &mut part).unwrap();
    assert_eq!(part, pattern[1024..2048]);
    // Writes are refused (nothing reaches the medium); ranges are checked.
    let media = enc.inner().contents();
    assert_eq!(
        enc.write_now(0, 1, &[1u8; 512]),
        Err(keel_storage::BlockError::Unsupported)
    );
    assert_eq!(enc.inner().contents(), media);
    assert_eq!(
        enc.read_now(63, 2, &mut part),
        Err(keel_storage::BlockError::OutOfRange)
    );
}

#[test]
fn a_refused_request_comes_back_in_plaintext_with_its_tag() {
    let ram = RamBackend::new(512, 8, 1).unwrap();
    let mut enc = EncryptedBackend::new(ram, &key(), 4);
    let data = vec![0xabu8; 512];
    let mk = |tag| {
        let mut io = IoBuf::leak_zeroed(512);
        io.as_mut_slice().copy_from_slice(&data);
        BlockRequest {
            tag,
            op: BlockOp::Write { fua: false },
            lba: 0,
            blocks: 1,
            buf: Some(io),
            buf_offset: 0,
        }
    };
    enc.submit(mk(1)).unwrap();
    // The RAM backend holds one request: the second is refused as Busy.
    let r = enc.submit(mk(2)).unwrap_err();
    assert!(matches!(r.reason, RejectReason::Busy));
    assert_eq!(r.req.tag, 2);
    assert_eq!(r.req.buf.unwrap().as_slice(), &data[..]);
    // Out of range is refused before anything is encrypted.
    let mut bad = mk(3);
    bad.lba = 8;
    assert!(matches!(
        enc.submit(bad).unwrap_err().reason,
        RejectReason::Invalid(_)
    ));
}

#[test]
fn verify_abort_and_deallocate_semantics() {
    let mut enc = EncryptedBackend::new(RamBackend::new(512, 16, 8).unwrap(), &key(), 8);
    let caps = enc.capabilities();
    assert!(caps.verify && caps.deallocate && !caps.write_zeroes);
    assert!(
        !caps.deallocate_reads_zero,
        "deallocated ciphertext decrypts to noise"
    );
    // Verify passes through (no buffer, nothing to decrypt).
    assert_eq!(run(&mut enc, BlockOp::Verify, 3, None).0, Ok(()));
    // A deallocated block reads back as the decryption of zeroes: not zeroes.
    run(
        &mut enc,
        BlockOp::Write { fua: false },
        2,
        Some(vec![0x55; 512]),
    )
    .0
    .unwrap();
    assert_eq!(run(&mut enc, BlockOp::Deallocate, 2, None).0, Ok(()));
    let (_, back) = run(&mut enc, BlockOp::Read, 2, Some(vec![0; 512]));
    assert!(back.unwrap().iter().any(|&b| b != 0));
    // Abort finds a request in flight by the caller's tag and reaches the RAM queue.
    let mut io = IoBuf::leak_zeroed(512);
    io.as_mut_slice().fill(9);
    enc.submit(BlockRequest::new(
        41,
        BlockOp::Write { fua: false },
        5,
        1,
        Some(io),
    ))
    .unwrap();
    assert!(!enc.abort(40));
    assert!(enc.abort(41));
    let mut done = Vec::new();
    enc.poll(&mut |c: BlockCompletion| done.push((c.tag, c.result)));
    assert_eq!(done, [(41, Err(keel_storage::BlockError::Aborted))]);
    assert!(
        enc.inner().contents()[5 * 512..6 * 512]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(!enc.abort(41), "no longer in flight");
}

proptest! {
    #[test]
    fn behaves_like_a_plain_disk(ops in proptest::collection::vec((0u64..60, 1usize..4, any::<u8>(), any::<bool>()), 1..40)) {
        let mut enc = EncryptedBackend::new(RamBackend::new(512, 64, 8).unwrap(), &key(), 8);
        let mut model = vec![0u8; 64 * 512];
        let mut written = [false; 64];
        for (lba, n, fill, write) in ops {
            let n = n.min(64 - lba as usize);
            let range = lba as usize * 512..(lba as usize + n) * 512;
            if write {
                let data: Vec<u8> = (0..n * 512).map(|i| fill.wrapping_add(i as u8)).collect();
                run(&mut enc, BlockOp::Write { fua: false }, lba, Some(data.clone())).0.unwrap();
                model[range].copy_from_slice(&data);
                written[lba as usize..lba as usize + n].iter_mut().for_each(|w| *w = true);
            } else {
                let (r, back) = run(&mut enc, BlockOp::Read, lba, Some(vec![0; n * 512]));
                r.unwrap();
                let back = back.unwrap();
                // Blocks never written hold whatever decrypting zeroes gives; written ones
                // read back exactly.
                for b in 0..n {
                    if written[lba as usize + b] {
                        prop_assert_eq!(&back[b * 512..(b + 1) * 512], &model[range.start + b * 512..range.start + (b + 1) * 512]);
                    }
                }
            }
        }
    }
}

proptest! {
    /// The batched implementation equals the `xts-mode` crate's (one block per call), for both
    /// key sizes, 512- and 4096-byte units and any LBA.
    #[test]
    fn matches_the_xts_mode_crate(seed in any::<u64>(), lba in any::<u64>(), units in 1usize..4, big in any::<bool>(), wide in any::<bool>()) {
        use aes::cipher::KeyInit;
        let mut x = seed | 1;
        let mut next = || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 };
        let key: Vec<u8> = (0..if wide { 64 } else { 32 }).map(|_| next()).collect();
        let bs = if big { 4096 } else { 512 };
        let data: Vec<u8> = (0..units * bs).map(|_| next()).collect();
        let Ok(k) = XtsKey::new(&key) else { return Ok(()) };
        let mut ours = data.clone();
        Xts::new(&k).encrypt(&mut ours, bs, lba);
        let mut theirs = data.clone();
        let (k1, k2) = key.split_at(key.len() / 2);
        if wide {
            let x = xts_mode::Xts128::new(aes::Aes256::new_from_slice(k1).unwrap(), aes::Aes256::new_from_slice(k2).unwrap());
            x.encrypt_area(&mut theirs, bs, u128::from(lba), xts_mode::get_tweak_default);
        } else {
            let x = xts_mode::Xts128::new(aes::Aes128::new_from_slice(k1).unwrap(), aes::Aes128::new_from_slice(k2).unwrap());
            x.encrypt_area(&mut theirs, bs, u128::from(lba), xts_mode::get_tweak_default);
        }
        // xts-mode numbers units from `lba` as u128; ours wraps at 2^64, identical below that.
        if lba.checked_add(units as u64).is_some() {
            prop_assert_eq!(&ours, &theirs);
        }
        Xts::new(&k).decrypt(&mut ours, bs, lba);
        prop_assert_eq!(ours, data);
    }
}
