//! TargetConnection: flows and hostile input (each fatal error checked byte-exactly in the
//! C2HTermReq).

mod common;
use common::*;
use keel_nvmf_tcp::capsule::{SGL_IN_CAPSULE, SGL_TRANSPORT};
use keel_nvmf_tcp::crc32c::crc32c;
use keel_nvmf_tcp::pdu::{Digests, Repr};
use keel_nvmf_tcp::{CloseReason, FatalError, TargetConfig, TargetConnection, TargetState};

const NONE: Digests = Digests {
    header: false,
    data: false,
};
const BOTH: Digests = Digests {
    header: true,
    data: true,
};

fn cfg4k() -> TargetConfig {
    TargetConfig {
        maxh2cdata: 4096,
        ..TargetConfig::default()
    }
}

fn ready_with(cfg: TargetConfig, dg: Digests, maxr2t: u32) -> (TargetConnection<Buf>, App) {
    let mut t = target(cfg);
    let mut app = App::new();
    app.feed(&mut t, 0, &icreq(dg, 0, maxr2t));
    assert_eq!(t.state(), TargetState::Ready);
    assert_eq!(app.tx.len(), 128);
    app.tx.clear();
    app.log.clear();
    (t, app)
}

fn ready(dg: Digests) -> (TargetConnection<Buf>, App) {
    ready_with(cfg4k(), dg, 0)
}

fn expect_term(t: &TargetConnection<Buf>, app: &App, fes: u16, fei: u32, hdr: &[u8]) {
    assert_eq!(app.tx, term_req(fes, fei, hdr), "C2HTermReq bytes");
    assert_eq!(t.state(), TargetState::Closed);
    assert!(matches!(app.closed, Some(CloseReason::Fatal(_))));
}

fn write_sqe(cid: u16, len: u32, in_capsule: bool) -> [u8; 64] {
    sqe(
        0x01,
        cid,
        if in_capsule {
            SGL_IN_CAPSULE
        } else {
            SGL_TRANSPORT
        },
        len,
        0,
    )
}

fn h2c(cccid: u16, ttag: u16, offset: u32, data: &[u8], last: bool, dg: Digests) -> Vec<u8> {
    pdu(
        &Repr::H2CData {
            cccid,
            ttag,
            offset,
            len: data.len() as u32,
            last,
        },
        dg,
        data,
    )
}

#[test]
fn icresp_exact_bytes() {
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    app.feed(&mut t, 0, &icreq(BOTH, 0, 0));
    let mut want = vec![0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    want.extend_from_slice(&[0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x02, 0x00]);
    want.resize(128, 0);
    assert_eq!(app.tx, want);
    assert_eq!(app.log, vec![format!("connected {BOTH:?}")]);
}

#[test]
fn config_validation() {
    for c in [
        TargetConfig {
            maxh2cdata: 4094,
            ..TargetConfig::default()
        },
        TargetConfig {
            maxh2cdata: 2048,
            ..TargetConfig::default()
        },
        TargetConfig {
            in_capsule_data: 4096,
            ..TargetConfig::default()
        },
        TargetConfig {
            slots: 0,
            ..TargetConfig::default()
        },
        TargetConfig {
            slots: 2000,
            ..TargetConfig::default()
        },
    ] {
        assert!(TargetConnection::<Buf>::new(c, 0).is_err());
    }
}

#[test]
fn in_capsule_write_and_response() {
    for dg in [NONE, BOTH] {
        let (mut t, mut app) = ready(dg);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let cmd = pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(5, 4096, true),
                data_len: 4096,
            },
            dg,
            &data,
        );
        app.feed(&mut t, 0, &cmd);
        assert_eq!(
            app.log,
            vec![
                "need cid=5 len=4096".to_string(),
                format!("cmd op=0x1 cid=5 len=4096 data_crc={:#x}", crc32c(&data)),
            ]
        );
        assert_eq!(&app.disk[..4096], &data[..]);
        assert_eq!(app.tx, pdu(&Repr::CapsuleResp { cqe: cqe(5, 0) }, dg, &[]));
    }
}

#[test]
fn r2t_write_multi_r2t_respects_maxr2t() {
    // 10000 bytes, R2Ts of 4096: 3 R2Ts; host MAXR2T=1 -> 2 outstanding.
    let (mut t, mut app) = ready_with(cfg4k(), BOTH, 1);
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(7, 10000, false),
                data_len: 0,
            },
            BOTH,
            &[],
        ),
    );
    let r2t = |k: u16, off: u32, len: u32| {
        pdu(
            &Repr::R2T {
                cccid: 7,
                ttag: 7 | k << 10,
                offset: off,
                len,
            },
            BOTH,
            &[],
        )
    };
    let mut want = r2t(0, 0, 4096);
    want.extend(r2t(1, 4096, 4096));
    assert_eq!(app.tx, want);
    app.tx.clear();
    let data: Vec<u8> = (0..10000u32).map(|i| (i * 3) as u8).collect();
    // The host splits R2T 0 into two H2CData PDUs.
    app.feed(&mut t, 0, &h2c(7, 7, 0, &data[..1000], false, BOTH));
    assert!(app.tx.is_empty());
    app.feed(&mut t, 0, &h2c(7, 7, 1000, &data[1000..4096], true, BOTH));
    assert_eq!(app.tx, r2t(2, 8192, 1808));
    app.tx.clear();
    app.feed(
        &mut t,
        0,
        &h2c(7, 7 | 1 << 10, 4096, &data[4096..8192], true, BOTH),
    );
    assert!(app.tx.is_empty());
    app.feed(
        &mut t,
        0,
        &h2c(7, 7 | 2 << 10, 8192, &data[8192..], true, BOTH),
    );
    assert_eq!(&app.disk[..10000], &data[..]);
    assert_eq!(
        app.tx,
        pdu(&Repr::CapsuleResp { cqe: cqe(7, 0) }, BOTH, &[])
    );
}

#[test]
fn read_multi_c2h_then_resp_or_success() {
    for fc_disabled in [false, true] {
        let cfg = TargetConfig {
            max_c2h_data: 1000,
            ..cfg4k()
        };
        let (mut t, mut app) = ready_with(cfg, NONE, 0);
        app.fc_disabled = fc_disabled;
        for (i, b) in app.disk.iter_mut().enumerate().take(2500) {
            *b = i as u8 ^ 0x5A;
        }
        let rd = sqe(0x02, 3, SGL_TRANSPORT, 2500, 0);
        app.feed(
            &mut t,
            0,
            &pdu(
                &Repr::CapsuleCmd {
                    sqe: rd,
                    data_len: 0,
                },
                NONE,
                &[],
            ),
        );
        let pdus = split_pdus(&app.tx);
        let n = if fc_disabled { 3 } else { 4 };
        assert_eq!(pdus.len(), n);
        for (k, p) in pdus.iter().take(3).enumerate() {
            let off = k as u32 * 1000;
            let len = if k == 2 { 500 } else { 1000 };
            let want = pdu(
                &Repr::C2HData {
                    cccid: 3,
                    offset: off,
                    len,
                    last: k == 2,
                    success: k == 2 && fc_disabled,
                },
                NONE,
                &app.disk[off as usize..(off + len) as usize],
            );
            assert_eq!(*p, &want[..]);
        }
        if !fc_disabled {
            assert_eq!(
                pdus[3],
                &pdu(&Repr::CapsuleResp { cqe: cqe(3, 0) }, NONE, &[])[..]
            );
        }
        assert!(app.log.iter().any(|l| l == "released cid=3"));
    }
}

#[test]
fn dataless_command_needs_no_buffer() {
    let (mut t, mut app) = ready(NONE);
    let flush = sqe(0x00, 9, SGL_TRANSPORT, 0, 0);
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: flush,
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    assert_eq!(
        app.log,
        vec!["cmd op=0x0 cid=9 len=0 data_crc=0x0".to_string()]
    );
    assert_eq!(
        app.tx,
        pdu(&Repr::CapsuleResp { cqe: cqe(9, 0) }, NONE, &[])
    );
}

#[test]
fn fabrics_connect_in_capsule_8k_always_accepted() {
    let (mut t, mut app) = ready(NONE);
    let mut s = sqe(0x7F, 1, SGL_IN_CAPSULE, 8192, 0);
    s[4] = 0x01; // Connect: host-to-controller
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: s,
                data_len: 8192,
            },
            NONE,
            &[7; 8192],
        ),
    );
    assert_eq!(app.log[0], "need cid=1 len=8192");
    assert_eq!(
        app.tx,
        pdu(&Repr::CapsuleResp { cqe: cqe(1, 0) }, NONE, &[])
    );
}

#[test]
fn buffer_backpressure_does_not_block_other_commands() {
    let (mut t, mut app) = ready(NONE);
    app.hold_buffers = true;
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(1, 100, false),
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    assert_eq!(app.need, vec![(1, 100)]);
    assert!(app.tx.is_empty());
    let rd = sqe(0x02, 2, SGL_TRANSPORT, 16, 0);
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: rd,
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    assert_eq!(split_pdus(&app.tx).len(), 2); // C2HData + CapsuleResp for cid 2
    app.tx.clear();
    t.provide_buffer(1, vec![0; 100]).unwrap();
    app.drain(&mut t);
    assert_eq!(
        app.tx,
        pdu(
            &Repr::R2T {
                cccid: 1,
                ttag: 1,
                offset: 0,
                len: 100
            },
            NONE,
            &[]
        )
    );
    // A buffer for an unknown command is handed back.
    let r = t.provide_buffer(42, vec![0; 10]).unwrap_err();
    assert_eq!(r.buf.unwrap().len(), 10);
}

#[test]
fn in_capsule_waits_for_buffer_then_resumes() {
    let (mut t, _app) = ready(NONE);
    let cmd = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(4, 64, true),
            data_len: 64,
        },
        NONE,
        &[9; 64],
    );
    let n = t.recv(0, &cmd);
    assert_eq!(n, 72, "stops at the data until a buffer is provided");
    assert!(matches!(
        t.poll_event(),
        Some(keel_nvmf_tcp::Event::NeedBuffer { cid: 4, len: 64 })
    ));
    assert_eq!(t.recv(0, &cmd[n..]), 0);
    t.provide_buffer(4, vec![0; 64]).unwrap();
    assert_eq!(t.recv(0, &cmd[n..]), 64);
    assert!(matches!(
        t.poll_event(),
        Some(keel_nvmf_tcp::Event::Command { data_len: 64, .. })
    ));
}

// ---- hostile input ----

#[test]
fn unknown_pdu_type() {
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    let bad = [0x08, 0, 0x18, 0, 0x18, 0, 0, 0];
    app.feed(&mut t, 0, &bad);
    expect_term(&t, &app, 1, 0, &bad);
}

#[test]
fn capsule_before_icreq_is_sequence_error() {
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    let cmd = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 0, false),
            data_len: 0,
        },
        NONE,
        &[],
    );
    app.feed(&mut t, 0, &cmd);
    expect_term(&t, &app, 2, 0, &cmd[..8]);
}

#[test]
fn second_icreq_is_sequence_error() {
    let (mut t, mut app) = ready(NONE);
    let ic = icreq(NONE, 0, 0);
    app.feed(&mut t, 0, &ic);
    expect_term(&t, &app, 2, 0, &ic[..8]);
}

#[test]
fn icreq_field_errors() {
    // PFV 1 -> Unsupported Parameter at byte 8 (whole header copied).
    let mut ic = icreq(NONE, 0, 0);
    ic[8] = 1;
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    app.feed(&mut t, 0, &ic);
    expect_term(&t, &app, 6, 8, &ic);
    // HPDA 32 -> invalid field at byte 10.
    let mut ic = icreq(NONE, 0, 0);
    ic[10] = 32;
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    app.feed(&mut t, 0, &ic);
    expect_term(&t, &app, 1, 10, &ic);
    // HLEN 127 -> byte 2; PLEN 129 -> byte 4 (only the common header was read).
    for (at, v, fei) in [(2usize, 127u8, 2u32), (4, 129, 4)] {
        let mut ic = icreq(NONE, 0, 0);
        ic[at] = v;
        let mut t = target(TargetConfig::default());
        let mut app = App::new();
        app.feed(&mut t, 0, &ic);
        expect_term(&t, &app, 1, fei, &ic[..8]);
    }
}

#[test]
fn capsule_resp_from_host_is_invalid_type() {
    let (mut t, mut app) = ready(NONE);
    let r = pdu(&Repr::CapsuleResp { cqe: cqe(1, 0) }, NONE, &[]);
    app.feed(&mut t, 0, &r);
    expect_term(&t, &app, 1, 0, &r[..8]);
}

#[test]
fn h2c_data_without_r2t_is_sequence_error() {
    let (mut t, mut app) = ready(NONE);
    let d = h2c(1, 0, 0, &[1; 16], true, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 2, 0, &d[..24]);
}

/// Ready target with cid 7 = write of `len` bytes and its first R2T (TTAG 7: the command's
/// slot is its CID modulo the slot count) outstanding.
fn with_r2t(len: u32) -> (TargetConnection<Buf>, App) {
    let (mut t, mut app) = ready(NONE);
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(7, len, false),
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    assert_eq!(split_pdus(&app.tx).len(), 1);
    app.tx.clear();
    (t, app)
}

#[test]
fn h2c_data_mismatches() {
    // Wrong TTAG while an R2T is outstanding.
    let (mut t, mut app) = with_r2t(100);
    let d = h2c(7, 5, 0, &[1; 100], true, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 1, 10, &d[..24]);
    // Wrong CCCID.
    let (mut t, mut app) = with_r2t(100);
    let d = h2c(8, 7, 0, &[1; 100], true, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 1, 8, &d[..24]);
    // Wrong offset.
    let (mut t, mut app) = with_r2t(100);
    let d = h2c(7, 7, 4, &[1; 96], true, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 4, 0, &d[..24]);
    // Longer than the R2T.
    let (mut t, mut app) = with_r2t(100);
    let d = h2c(7, 7, 0, &[1; 200], true, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 4, 0, &d[..24]);
    // LAST_PDU missing on the last PDU of the R2T.
    let (mut t, mut app) = with_r2t(100);
    let d = h2c(7, 7, 0, &[1; 100], false, NONE);
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 1, 1, &d[..24]);
    // DATAL inconsistent with PLEN.
    let (mut t, mut app) = with_r2t(100);
    let mut d = h2c(7, 7, 0, &[1; 100], true, NONE);
    d[16] = 99;
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 1, 16, &d[..24]);
    // PLEN beyond MAXH2CDATA: rejected from the common header alone.
    let (mut t, mut app) = with_r2t(100);
    let mut d = h2c(7, 7, 0, &[1; 16], true, NONE);
    d[4..8].copy_from_slice(&(24u32 + 4097).to_le_bytes());
    app.feed(&mut t, 0, &d);
    expect_term(&t, &app, 5, 0, &d[..8]);
}

#[test]
fn in_capsule_over_limit_and_hostile_plen() {
    let (mut t, mut app) = ready(NONE);
    let mut c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 8193, true),
            data_len: 8193,
        },
        NONE,
        &[0; 8193],
    );
    app.feed(&mut t, 0, &c[..100]);
    expect_term(&t, &app, 5, 0, &c[..8]);
    assert_eq!(app.max_need, 0);
    let (mut t, mut app) = ready(NONE);
    c[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    app.feed(&mut t, 0, &c[..8]);
    expect_term(&t, &app, 5, 0, &c[..8]);
    assert_eq!(app.max_need, 0);
}

#[test]
fn header_digest_error() {
    let (mut t, mut app) = ready(BOTH);
    let mut c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 0, false),
            data_len: 0,
        },
        BOTH,
        &[],
    );
    c[72] ^= 1;
    app.feed(&mut t, 0, &c);
    expect_term(&t, &app, 3, 0, &c);
}

#[test]
fn digest_flag_mismatch() {
    let (mut t, mut app) = ready(BOTH);
    let c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 0, false),
            data_len: 0,
        },
        NONE,
        &[],
    );
    app.feed(&mut t, 0, &c);
    expect_term(&t, &app, 1, 1, &c[..8]);
}

#[test]
fn misaligned_pdo() {
    let (mut t, mut app) = ready(NONE);
    let mut c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 16, true),
            data_len: 16,
        },
        NONE,
        &[0; 16],
    );
    c[3] = 74;
    app.feed(&mut t, 0, &c);
    expect_term(&t, &app, 1, 3, &c[..8]);
}

#[test]
fn data_digest_error_fails_command_only() {
    let (mut t, mut app) = ready(BOTH);
    let mut c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 16, true),
            data_len: 16,
        },
        BOTH,
        &[3; 16],
    );
    let n = c.len();
    c[n - 1] ^= 0xFF;
    app.feed(&mut t, 0, &c);
    assert_eq!(app.log[1], format!("failed cid=1 status={TRANSIENT}"));
    assert_eq!(
        app.tx,
        pdu(
            &Repr::CapsuleResp {
                cqe: cqe(1, 0x22 << 1)
            },
            BOTH,
            &[]
        )
    );
    assert_eq!(t.state(), TargetState::Ready);
    // Same for solicited data.
    app.tx.clear();
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(2, 32, false),
                data_len: 0,
            },
            BOTH,
            &[],
        ),
    );
    app.tx.clear();
    let mut d = h2c(2, 2, 0, &[1; 32], true, BOTH);
    let n = d.len();
    d[n - 2] ^= 1;
    app.feed(&mut t, 0, &d);
    assert_eq!(
        app.tx,
        pdu(
            &Repr::CapsuleResp {
                cqe: cqe(2, 0x22 << 1)
            },
            BOTH,
            &[]
        )
    );
    assert_eq!(t.state(), TargetState::Ready);
}

#[test]
fn queue_depth_limit_and_cid_reuse() {
    let cfg = TargetConfig {
        initial_queue_depth: 2,
        ..cfg4k()
    };
    let (mut t, mut app) = ready_with(cfg, NONE, 0);
    app.hold_buffers = true;
    for cid in [1, 2] {
        app.feed(
            &mut t,
            0,
            &pdu(
                &Repr::CapsuleCmd {
                    sqe: write_sqe(cid, 10, false),
                    data_len: 0,
                },
                NONE,
                &[],
            ),
        );
    }
    let c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(3, 10, false),
            data_len: 0,
        },
        NONE,
        &[],
    );
    app.feed(&mut t, 0, &c);
    expect_term(&t, &app, 2, 0, &c);

    let (mut t, mut app) = ready(NONE);
    app.hold_buffers = true;
    let c = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(1, 10, false),
            data_len: 0,
        },
        NONE,
        &[],
    );
    app.feed(&mut t, 0, &c);
    app.feed(&mut t, 0, &c);
    expect_term(&t, &app, 1, 10, &c);
    // After Connect the application raises the depth.
    let (mut t, mut app) = ready_with(
        TargetConfig {
            initial_queue_depth: 1,
            ..cfg4k()
        },
        NONE,
        0,
    );
    t.set_queue_depth(4);
    app.hold_buffers = true;
    for cid in 1..=4 {
        app.feed(
            &mut t,
            0,
            &pdu(
                &Repr::CapsuleCmd {
                    sqe: write_sqe(cid, 10, false),
                    data_len: 0,
                },
                NONE,
                &[],
            ),
        );
    }
    assert_eq!(t.state(), TargetState::Ready);
}

/// Commands whose CIDs share a home slot (CID modulo the slot count) are found wherever they
/// landed: buffers provided out of order, a duplicate CID in a displaced slot is refused.
#[test]
fn colliding_cids_are_found_in_any_slot() {
    let cfg = TargetConfig {
        slots: 8,
        initial_queue_depth: 8,
        ..cfg4k()
    };
    let (mut t, mut app) = ready_with(cfg, NONE, 0);
    app.hold_buffers = true;
    let capsule = |cid| {
        pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(cid, 10, false),
                data_len: 0,
            },
            NONE,
            &[],
        )
    };
    for cid in [3, 11, 19, 4, 12] {
        app.feed(&mut t, 0, &capsule(cid));
    }
    assert_eq!(
        app.need.iter().map(|n| n.0).collect::<Vec<_>>(),
        [3, 11, 19, 4, 12]
    );
    assert!(t.provide_buffer(27, vec![0; 10]).is_err(), "never sent");
    for cid in [19, 4, 3, 12, 11] {
        t.provide_buffer(cid, vec![0; 10]).unwrap();
        assert!(
            t.provide_buffer(cid, vec![0; 10]).is_err(),
            "already has one"
        );
    }
    app.drain(&mut t);
    let r2ts = split_pdus(&app.tx);
    assert_eq!(r2ts.len(), 5);
    // Each R2T's CCCID is the command's, its TTAG names the slot that holds it.
    let cccids: Vec<u16> = r2ts
        .iter()
        .map(|p| u16::from_le_bytes([p[8], p[9]]))
        .collect();
    assert_eq!(cccids, [19, 4, 3, 12, 11]);
    // Data for the displaced command 19 completes it.
    let ttag19 = u16::from_le_bytes([r2ts[0][10], r2ts[0][11]]);
    app.tx.clear();
    app.feed(&mut t, 0, &h2c(19, ttag19, 0, &[7; 10], true, NONE));
    assert!(
        app.log
            .iter()
            .any(|l| l.starts_with("cmd op=0x1 cid=19 len=10")),
        "{:?}",
        app.log
    );
    assert_eq!(t.state(), TargetState::Ready);
    // Its CID is free again; 11 (displaced, still receiving) is not.
    app.feed(&mut t, 0, &capsule(19));
    assert_eq!(t.state(), TargetState::Ready);
    app.drain(&mut t);
    app.tx.clear();
    let dup = capsule(11);
    app.feed(&mut t, 0, &dup);
    expect_term(&t, &app, 1, 10, &dup);
}

#[test]
fn bad_sgl_types_fail_the_command() {
    let (mut t, mut app) = ready(NONE);
    // Keyed SGL (4h) is invalid on TCP.
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: sqe(0x01, 1, 0x40, 512, 0),
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    // In-capsule SGL length different from the data carried.
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: sqe(0x01, 2, SGL_IN_CAPSULE, 20, 0),
                data_len: 16,
            },
            NONE,
            &[0; 16],
        ),
    );
    assert_eq!(app.log[0], "failed cid=1 status=SCT 0x0 SC 0x11 DNR");
    assert_eq!(app.log[1], "failed cid=2 status=SCT 0x0 SC 0x0f DNR");
    assert_eq!(t.state(), TargetState::Ready);
}

#[test]
fn host_term_req_closes() {
    let (mut t, mut app) = ready(NONE);
    let tr = pdu(
        &Repr::TermReq {
            c2h: false,
            fes: 2,
            fei: 0,
            data_len: 8,
        },
        NONE,
        &[0; 8],
    );
    app.feed(&mut t, 0, &tr);
    assert!(app.tx.is_empty());
    assert_eq!(
        app.closed,
        Some(CloseReason::PeerTerminated { fes: 2, fei: 0 })
    );
    assert_eq!(t.recv(0, &[1, 2, 3]), 3);
}

#[test]
fn icreq_timeout() {
    let mut t = target(TargetConfig::default());
    let mut app = App::new();
    t.poll_timers(9_999);
    assert_eq!(t.state(), TargetState::AwaitIc);
    t.poll_timers(10_000);
    app.service(&mut t);
    assert_eq!(app.closed, Some(CloseReason::IcReqTimeout));
}

#[test]
fn fatal_error_returns_held_buffers() {
    let (mut t, mut app) = ready(NONE);
    app.feed(
        &mut t,
        0,
        &pdu(
            &Repr::CapsuleCmd {
                sqe: write_sqe(1, 100, false),
                data_len: 0,
            },
            NONE,
            &[],
        ),
    );
    app.tx.clear();
    let bad = [0x0Au8, 0, 0, 0, 0, 0, 0, 0];
    app.feed(&mut t, 0, &bad);
    assert!(app.log.iter().any(|l| l == "released cid=1"));
    expect_term(&t, &app, 1, 0, &bad);
    assert_eq!(
        t.close_reason(),
        Some(CloseReason::Fatal(FatalError::InvalidHeaderField {
            offset: 0
        }))
    );
}

#[test]
fn refused_buffers_fail_the_command_and_skip_in_capsule_data() {
    use keel_nvmf_tcp::{Cqe, Event, Status};
    let (mut t, mut app) = ready(NONE);
    let cmd = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(4, 64, true),
            data_len: 64,
        },
        NONE,
        &[9; 64],
    );
    let n = t.recv(0, &cmd);
    assert!(matches!(
        t.poll_event(),
        Some(Event::NeedBuffer { cid: 4, .. })
    ));
    t.refuse_buffer(4, Status::INVALID_FIELD).unwrap();
    assert_eq!(t.recv(0, &cmd[n..]), 64);
    let r2t_cmd = pdu(
        &Repr::CapsuleCmd {
            sqe: write_sqe(5, 100, false),
            data_len: 0,
        },
        NONE,
        &[],
    );
    assert_eq!(t.recv(0, &r2t_cmd), r2t_cmd.len());
    assert!(matches!(
        t.poll_event(),
        Some(Event::CommandFailed {
            status: Status::INVALID_FIELD,
            ..
        })
    ));
    t.complete(Cqe::new(4, Status::INVALID_FIELD), None, false)
        .unwrap();
    assert!(matches!(
        t.poll_event(),
        Some(Event::NeedBuffer { cid: 5, .. })
    ));
    t.refuse_buffer(5, Status::DATA_SGL_LENGTH_INVALID).unwrap();
    app.hold_buffers = true;
    app.service(&mut t);
    app.drain(&mut t);
    let mut want = pdu(
        &Repr::CapsuleResp {
            cqe: cqe(4, 0x02 << 1 | 1 << 15),
        },
        NONE,
        &[],
    );
    want.extend(pdu(
        &Repr::CapsuleResp {
            cqe: cqe(5, 0x0F << 1 | 1 << 15),
        },
        NONE,
        &[],
    ));
    assert_eq!(app.tx, want);
    assert_eq!(t.state(), TargetState::Ready);
    assert!(t.refuse_buffer(5, Status::INVALID_FIELD).is_err());
}
