//! Byte-exact PDU vectors (hand-assembled from the NVMe/TCP 1.0 §3.6 figures) and encode/decode
//! round trips.

use keel_nvmf_tcp::crc32c::crc32c;
use keel_nvmf_tcp::pdu::{Digests, Header, PduType, Repr, encode_pdu};
use proptest::prelude::*;

const NONE: Digests = Digests {
    header: false,
    data: false,
};
const BOTH: Digests = Digests {
    header: true,
    data: true,
};

fn enc(repr: &Repr, dg: Digests, pda: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 512 + data.len()];
    let n = encode_pdu(&mut out, repr, dg, pda, data).unwrap();
    out.truncate(n);
    out
}

#[test]
fn icreq_as_linux_sends_it() {
    let v = enc(
        &Repr::IcReq {
            pfv: 0,
            hpda: 0,
            digests: BOTH,
            maxr2t: 0,
        },
        NONE,
        0,
        &[],
    );
    let mut want = vec![0x00, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    want.extend_from_slice(&[0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00]);
    want.resize(128, 0);
    assert_eq!(v, want);
}

#[test]
fn icresp_bytes() {
    let v = enc(
        &Repr::IcResp {
            pfv: 0,
            cpda: 0,
            digests: Digests {
                header: true,
                data: false,
            },
            maxh2cdata: 0x0002_0000,
        },
        BOTH, // IC PDUs never carry digests whatever is negotiated
        0,
        &[],
    );
    let mut want = vec![0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    want.extend_from_slice(&[0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x02, 0x00]);
    want.resize(128, 0);
    assert_eq!(v, want);
}

#[test]
fn term_req_bytes() {
    let v = enc(
        &Repr::TermReq {
            c2h: true,
            fes: 0x0001,
            fei: 0x0000_0004,
            data_len: 0,
        },
        BOTH,
        0,
        &[],
    );
    let mut want = vec![0x03, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    want.extend_from_slice(&[0x01, 0x00, 0x04, 0x00, 0x00, 0x00]);
    want.resize(24, 0);
    assert_eq!(v, want);
    let v = enc(
        &Repr::TermReq {
            c2h: false,
            fes: 2,
            fei: 0,
            data_len: 8,
        },
        NONE,
        0,
        &[0xAA; 8],
    );
    assert_eq!(&v[..8], &[0x02, 0x00, 0x18, 0x00, 0x20, 0x00, 0x00, 0x00]);
    assert_eq!(&v[24..], &[0xAA; 8]);
}

#[test]
fn capsule_cmd_plain_and_with_digests() {
    let mut sqe = [0u8; 64];
    sqe[0] = 0x01;
    sqe[2] = 0x34;
    sqe[3] = 0x12;
    let v = enc(&Repr::CapsuleCmd { sqe, data_len: 0 }, NONE, 0, &[]);
    let mut want = vec![0x04, 0x00, 0x48, 0x00, 0x48, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe);
    assert_eq!(v, want);

    // 16 bytes in-capsule data, both digests: PDO = 72 + 4 = 76, PLEN = 76 + 16 + 4 = 96.
    let data: Vec<u8> = (0..16).collect();
    let v = enc(&Repr::CapsuleCmd { sqe, data_len: 16 }, BOTH, 0, &data);
    let mut want = vec![0x04, 0x03, 0x48, 0x4C, 0x60, 0x00, 0x00, 0x00];
    want.extend_from_slice(&sqe);
    let hd = crc32c(&want[..72]);
    want.extend_from_slice(&hd.to_le_bytes());
    want.extend_from_slice(&data);
    want.extend_from_slice(&crc32c(&data).to_le_bytes());
    assert_eq!(v, want);
}

#[test]
fn capsule_resp_bytes() {
    let mut cqe = [0u8; 16];
    cqe[12] = 7;
    let v = enc(&Repr::CapsuleResp { cqe }, NONE, 0, &[]);
    let mut want = vec![0x05, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    want.extend_from_slice(&cqe);
    assert_eq!(v, want);
    let v = enc(&Repr::CapsuleResp { cqe }, BOTH, 0, &[]);
    assert_eq!(&v[..8], &[0x05, 0x01, 0x18, 0x00, 0x1C, 0x00, 0x00, 0x00]);
    assert_eq!(&v[24..28], &crc32c(&v[..24]).to_le_bytes());
}

#[test]
fn h2c_data_bytes() {
    let data = [0x5Au8; 8];
    let v = enc(
        &Repr::H2CData {
            cccid: 0x0102,
            ttag: 0x0304,
            offset: 0x1000,
            len: 8,
            last: true,
        },
        NONE,
        0,
        &data,
    );
    let want = [
        0x06, 0x04, 0x18, 0x18, 0x20, 0x00, 0x00, 0x00, // CH: LAST_PDU, PDO 24, PLEN 32
        0x02, 0x01, 0x04, 0x03, 0x00, 0x10, 0x00, 0x00, // CCCID, TTAG, DATAO
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DATAL, reserved
        0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A, 0x5A,
    ];
    assert_eq!(v, want);
}

#[test]
fn c2h_data_with_hpda_padding() {
    // HPDA 3 -> 16-byte alignment; header 24 + digest 4 = 28 -> PDO 32, 4 bytes of padding.
    let data = [1u8, 2, 3, 4];
    let v = enc(
        &Repr::C2HData {
            cccid: 9,
            offset: 0,
            len: 4,
            last: true,
            success: true,
        },
        BOTH,
        3,
        &data,
    );
    assert_eq!(&v[..8], &[0x07, 0x0F, 0x18, 0x20, 0x28, 0x00, 0x00, 0x00]);
    assert_eq!(&v[8..10], &[9, 0]);
    assert_eq!(&v[16..20], &[4, 0, 0, 0]);
    assert_eq!(&v[24..28], &crc32c(&v[..24]).to_le_bytes());
    assert_eq!(&v[28..32], &[0; 4]);
    assert_eq!(&v[32..36], &data);
    assert_eq!(&v[36..40], &crc32c(&data).to_le_bytes());
}

#[test]
fn r2t_bytes() {
    let v = enc(
        &Repr::R2T {
            cccid: 1,
            ttag: 2,
            offset: 0x20000,
            len: 0x20000,
        },
        NONE,
        0,
        &[],
    );
    let want = [
        0x09, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00, 0x01, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02,
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    assert_eq!(v, want);
}

fn arb_digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

fn arb_repr() -> impl Strategy<Value = Repr> {
    prop_oneof![
        (any::<u8>(), arb_digests(), any::<u32>()).prop_map(|(h, d, m)| Repr::IcReq {
            pfv: 0,
            hpda: h % 32,
            digests: d,
            maxr2t: m
        }),
        (any::<u8>(), arb_digests(), any::<u32>()).prop_map(|(c, d, m)| Repr::IcResp {
            pfv: 0,
            cpda: c % 32,
            digests: d,
            maxh2cdata: m
        }),
        (any::<bool>(), any::<u16>(), any::<u32>(), 0u8..=128).prop_map(|(c, fes, fei, n)| {
            Repr::TermReq {
                c2h: c,
                fes,
                fei,
                data_len: n,
            }
        }),
        (prop::array::uniform32(any::<u8>()), 0u32..3000).prop_map(|(h, n)| {
            let mut sqe = [0u8; 64];
            sqe[..32].copy_from_slice(&h);
            Repr::CapsuleCmd { sqe, data_len: n }
        }),
        prop::array::uniform16(any::<u8>()).prop_map(|cqe| Repr::CapsuleResp { cqe }),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            1u32..3000,
            any::<bool>()
        )
            .prop_map(|(c, t, o, l, last)| Repr::H2CData {
                cccid: c,
                ttag: t,
                offset: o,
                len: l,
                last
            }),
        (
            any::<u16>(),
            any::<u32>(),
            1u32..3000,
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(c, o, l, last, s)| Repr::C2HData {
                cccid: c,
                offset: o,
                len: l,
                last,
                success: s
            }),
        (any::<u16>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(|(c, t, o, l)| {
            Repr::R2T {
                cccid: c,
                ttag: t,
                offset: o,
                len: l,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn encode_decode_round_trip(repr in arb_repr(), dg in arb_digests(), pda in 0u8..32) {
        let lay = repr.layout(dg, pda);
        let data: Vec<u8> = (0..lay.data_len).map(|i| i as u8).collect();
        let v = enc(&repr, dg, pda, &data);
        prop_assert_eq!(v.len(), lay.plen);
        let h = Header::new_checked(&v[..]).unwrap();
        prop_assert_eq!(h.ch().plen() as usize, v.len());
        prop_assert_eq!(Repr::parse(&h), repr);
        let ty = repr.pdu_type();
        if dg.header && ty.digestible() {
            let hl = ty.hlen();
            prop_assert_eq!(&v[hl..hl + 4], &crc32c(&v[..hl]).to_le_bytes()[..]);
        }
        if lay.data_len > 0 && ty != PduType::H2CTermReq && ty != PduType::C2HTermReq {
            prop_assert_eq!(lay.pdo % ((pda as usize + 1) * 4), 0);
            prop_assert_eq!(&v[lay.pdo..lay.pdo + lay.data_len], &data[..]);
        }
    }

    #[test]
    fn header_view_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(h) = Header::new_checked(&bytes[..]) {
            let _ = Repr::parse(&h);
            let _ = (h.pfv(), h.fes(), h.fei(), h.sqe(), h.cqe(), h.cccid(), h.ttag());
        }
    }
}
