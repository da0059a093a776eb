//! The same host byte stream cut at every possible boundary (and at random multi-cuts) yields
//! the same target events and the same transmitted bytes.

mod common;
use common::*;
use keel_nvmf_tcp::capsule::{SGL_IN_CAPSULE, SGL_TRANSPORT};
use keel_nvmf_tcp::pdu::{Digests, Repr};
use keel_nvmf_tcp::{TargetConfig, TargetConnection, TargetState};
use proptest::prelude::*;

const BOTH: Digests = Digests {
    header: true,
    data: true,
};

fn cfg() -> TargetConfig {
    TargetConfig {
        maxh2cdata: 4096,
        max_c2h_data: 2048,
        ..TargetConfig::default()
    }
}

/// Flight 1: everything the host sends before any R2T.
fn flight1() -> Vec<u8> {
    let mut v = icreq(BOTH, 0, 1);
    let mut connect = sqe(0x7F, 1, SGL_IN_CAPSULE, 1024, 0);
    connect[4] = 0x01;
    v.extend(pdu(
        &Repr::CapsuleCmd {
            sqe: connect,
            data_len: 1024,
        },
        BOTH,
        &[0xC0; 1024],
    ));
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    v.extend(pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x01, 2, SGL_IN_CAPSULE, 3000, 0),
            data_len: 3000,
        },
        BOTH,
        &data,
    ));
    v.extend(pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x02, 3, SGL_TRANSPORT, 5000, 0),
            data_len: 0,
        },
        BOTH,
        &[],
    ));
    v.extend(pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x00, 4, SGL_TRANSPORT, 0, 0),
            data_len: 0,
        },
        BOTH,
        &[],
    ));
    v.extend(pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x01, 5, SGL_TRANSPORT, 6000, 8000),
            data_len: 0,
        },
        BOTH,
        &[],
    ));
    v
}

/// Flight 2: the H2CData answering the R2Ts found in the target's output.
fn flight2(tx: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in split_pdus(tx) {
        if p[0] == 0x09 {
            let cccid = u16::from_le_bytes([p[8], p[9]]);
            let ttag = u16::from_le_bytes([p[10], p[11]]);
            let off = u32::from_le_bytes(p[12..16].try_into().unwrap());
            let len = u32::from_le_bytes(p[16..20].try_into().unwrap());
            let data: Vec<u8> = (off..off + len).map(|i| (i * 5) as u8).collect();
            v.extend(pdu(
                &Repr::H2CData {
                    cccid,
                    ttag,
                    offset: off,
                    len,
                    last: true,
                },
                BOTH,
                &data,
            ));
        }
    }
    v
}

/// Feed pieces; the application only acts when the target stops consuming (a stall) and at
/// the end of the flight, so its actions happen at stream positions, not at cut positions.
fn feed_pieces(t: &mut TargetConnection<Buf>, app: &mut App, flight: &[u8], cuts: &[usize]) {
    let mut prev = 0;
    let mut bounds: Vec<usize> = cuts
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < flight.len())
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(flight.len());
    for b in bounds {
        let mut piece = &flight[prev..b];
        let mut spins = 0;
        while !piece.is_empty() {
            let n = t.recv(0, piece);
            piece = &piece[n..];
            if !piece.is_empty() {
                app.service(t);
                app.drain(t);
                if n == 0 {
                    spins += 1;
                    assert!(spins < 3, "stalled");
                }
            }
        }
        prev = b;
    }
    app.service(t);
    app.drain(t);
}

fn run(
    cuts1: &[usize],
    cuts2: &[usize],
    f1: &[u8],
    f2: Option<&[u8]>,
) -> (Vec<String>, Vec<u8>, Vec<u8>) {
    let mut t = target(cfg());
    let mut app = App::new();
    feed_pieces(&mut t, &mut app, f1, cuts1);
    let f2_owned;
    let f2 = match f2 {
        Some(f) => f,
        None => {
            f2_owned = flight2(&app.tx);
            &f2_owned
        }
    };
    feed_pieces(&mut t, &mut app, f2, cuts2);
    assert_eq!(t.state(), TargetState::Ready, "{:?}", app.log);
    (app.log, app.tx, f2.to_vec())
}

#[test]
fn every_single_cut_gives_the_same_result() {
    let f1 = flight1();
    let (log, tx, f2) = run(&[], &[], &f1, None);
    assert_eq!(
        log.iter().filter(|l| l.starts_with("cmd")).count(),
        5,
        "{log:?}"
    );
    assert_eq!(split_pdus(&f2).len(), 2, "two R2Ts (MAXR2T 1)");
    for c in 0..=f1.len() {
        let r = run(&[c], &[], &f1, Some(&f2));
        assert_eq!((&r.0, &r.1), (&log, &tx), "cut {c} of flight 1");
    }
    for c in 0..=f2.len() {
        let r = run(&[], &[c], &f1, Some(&f2));
        assert_eq!((&r.0, &r.1), (&log, &tx), "cut {c} of flight 2");
    }
    // Byte by byte.
    let all1: Vec<usize> = (0..f1.len()).collect();
    let all2: Vec<usize> = (0..f2.len()).collect();
    let r = run(&all1, &all2, &f1, Some(&f2));
    assert_eq!((&r.0, &r.1), (&log, &tx));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn random_multi_cuts_give_the_same_result(
        c1 in prop::collection::vec(0usize..20000, 0..40),
        c2 in prop::collection::vec(0usize..20000, 0..40),
    ) {
        let f1 = flight1();
        let (log, tx, f2) = run(&[], &[], &f1, None);
        let c1: Vec<usize> = c1.into_iter().map(|c| c % (f1.len() + 1)).collect();
        let c2: Vec<usize> = c2.into_iter().map(|c| c % (f2.len() + 1)).collect();
        let r = run(&c1, &c2, &f1, Some(&f2));
        prop_assert_eq!(r.0, log);
        prop_assert_eq!(r.1, tx);
    }
}

/// `KEEL_FUZZ_SEEDS=1 cargo test -p keel-nvmf-tcp --test segmentation -- --ignored` writes
/// valid streams into fuzz/seeds/target_recv as seeds (mode byte 0x00: no ICReq prefix).
#[test]
#[ignore]
fn write_fuzz_seeds() {
    if std::env::var_os("KEEL_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/target_recv");
    std::fs::create_dir_all(dir).unwrap();
    let f1 = flight1();
    let (_, _, f2) = run(&[], &[], &f1, None);
    let mut all = vec![0u8];
    all.extend_from_slice(&f1);
    all.extend_from_slice(&f2);
    std::fs::write(format!("{dir}/seed-flights"), &all).unwrap();
    let mut one = vec![0u8];
    one.extend_from_slice(&f1);
    std::fs::write(format!("{dir}/seed-flight1"), &one).unwrap();
}
