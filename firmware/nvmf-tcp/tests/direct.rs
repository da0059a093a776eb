//! Data without buffers: reads completed straight in the transmit window
//! (`complete_in_window`), in-capsule writes run where they were received (`recv_direct`).
//! Expected bytes are written by hand from NVMe/TCP 1.0 §3.6 (C2HData and CapsuleResp
//! figures; FLAGS bit 2 LAST_PDU, bit 3 SUCCESS as Linux `NVME_TCP_F_DATA_LAST` /
//! `NVME_TCP_F_DATA_SUCCESS`); the property tests compare the direct paths with the buffered
//! ones, whose bytes the known-answer tests pin.

mod common;
use common::*;
use keel_nvme::{Cqe, Sqe, Status};
use keel_nvmf_tcp::capsule::{SGL_IN_CAPSULE, SGL_TRANSPORT};
use keel_nvmf_tcp::pdu::{Digests, Repr};
use keel_nvmf_tcp::{Event, TargetConfig, TargetConnection, TargetState};
use proptest::prelude::*;

const NONE: Digests = Digests {
    header: false,
    data: false,
};

fn ready(dg: Digests, hpda: u8) -> TargetConnection<Buf> {
    let mut t = target(TargetConfig::default());
    t.recv(0, &icreq(dg, hpda, 0));
    assert!(matches!(t.poll_event(), Some(Event::Connected { .. })));
    let mut out = [0u8; 256];
    assert_eq!(t.transmit(&mut out), 128);
    assert_eq!(t.state(), TargetState::Ready);
    t
}

/// A read of `len` bytes (transport SGL) as CID `cid`, handed out as a `Command` event.
fn read_cmd(t: &mut TargetConnection<Buf>, cid: u16, len: u32, dg: Digests) -> Sqe {
    let capsule = pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x02, cid, SGL_TRANSPORT, len, 0),
            data_len: 0,
        },
        dg,
        &[],
    );
    assert_eq!(t.recv(0, &capsule), capsule.len());
    match t.poll_event() {
        Some(Event::Command {
            sqe,
            buf: None,
            data_len,
        }) => {
            assert_eq!((sqe.cid, data_len), (cid, len));
            sqe
        }
        e => panic!("expected the read, got {e:?}"),
    }
}

/// CapsuleResp without digests: type 05h, HLEN 24, PLEN 24, then the CQE (CID at byte 12,
/// status field at 14).
fn resp_bytes(cid: u16, status_field: u16) -> Vec<u8> {
    let mut v = vec![0x05, 0x00, 0x18, 0x00, 0x18, 0x00, 0x00, 0x00];
    v.extend_from_slice(&cqe(cid, status_field));
    v
}

/// C2HData without digests, DATAO 0: type 07h, HLEN 24, PDO 24, PLEN 24 + data.
fn c2h_bytes(cid: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x07, flags, 0x18, 0x18];
    v.extend_from_slice(&(24 + data.len() as u32).to_le_bytes());
    v.extend_from_slice(&cid.to_le_bytes());
    v.extend_from_slice(&[0; 6]); // reserved, DATAO 0
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(data);
    v
}

fn ok(cid: u16) -> Cqe {
    Cqe::new(cid, Status::SUCCESS)
}

#[test]
fn a_read_lands_in_the_window_with_success_and_no_response_capsule() {
    let mut t = ready(NONE, 0);
    read_cmd(&mut t, 5, 8, NONE);
    let mut win = [0xEEu8; 100];
    let n = t.complete_in_window(5, &mut win, true, |dst| {
        assert_eq!(dst.len(), 8);
        dst.copy_from_slice(b"KEELDATA");
        Some((ok(5), 8))
    });
    // C2HData, FLAGS 0Ch (LAST_PDU | SUCCESS), PLEN 32, and nothing after it.
    assert_eq!(&win[..n], &c2h_bytes(5, 0x0C, b"KEELDATA")[..]);
    assert!(!t.wants_transmit());
    assert!(t.poll_event().is_none(), "no buffer to give back");
    // CID 5 is free again.
    read_cmd(&mut t, 5, 8, NONE);
}

#[test]
fn with_sq_flow_control_the_response_capsule_follows() {
    let mut t = ready(NONE, 0);
    read_cmd(&mut t, 6, 4, NONE);
    let mut win = [0u8; 100];
    let n = t.complete_in_window(6, &mut win, false, |dst| {
        dst.copy_from_slice(&[1, 2, 3, 4]);
        let mut c = ok(6);
        c.sqhd = 9;
        Some((c, 4))
    });
    let mut want = c2h_bytes(6, 0x04, &[1, 2, 3, 4]);
    let mut resp = resp_bytes(6, 0);
    resp[8 + 8] = 9; // SQHD, CQE bytes 8-9
    want.extend_from_slice(&resp);
    assert_eq!(&win[..n], &want[..]);
}

#[test]
fn success_is_never_claimed_for_a_failure_or_a_cqe_with_content() {
    // A failed read (LBA Out of Range with DNR: status field SC 80h at bits 8:1, DNR bit 15 =
    // 8100h): only the response capsule with its status, no data, even with SQ flow control
    // disabled.
    let mut t = ready(NONE, 0);
    read_cmd(&mut t, 7, 8, NONE);
    let mut win = [0u8; 100];
    let n = t.complete_in_window(7, &mut win, true, |dst| {
        dst.fill(0x55); // whatever the medium left there is not sent
        Some((Cqe::new(7, Status::LBA_OUT_OF_RANGE), 8))
    });
    assert_eq!(&win[..n], &resp_bytes(7, 0x8100)[..]);
    // A success CQE with DW0 set cannot be synthesised by the host: data, then the capsule.
    read_cmd(&mut t, 8, 4, NONE);
    let n = t.complete_in_window(8, &mut win, true, |dst| {
        dst.copy_from_slice(&[9; 4]);
        let mut c = ok(8);
        c.dw0 = 1;
        Some((c, 4))
    });
    let mut want = c2h_bytes(8, 0x04, &[9; 4]);
    let mut resp = resp_bytes(8, 0);
    resp[8] = 1;
    want.extend_from_slice(&resp);
    assert_eq!(&win[..n], &want[..]);
}

#[test]
fn what_cannot_go_in_the_window_is_left_to_the_usual_path() {
    let mut t = ready(NONE, 0);
    read_cmd(&mut t, 1, 64, NONE);
    let mut called = false;
    // Too small for header + data: exec is not called.
    let mut small = [0u8; 24 + 63];
    assert_eq!(
        t.complete_in_window(1, &mut small, true, |_| {
            called = true;
            None
        }),
        0
    );
    assert!(!called);
    // Unknown command, and exec declining: nothing written.
    let mut win = [0u8; 200];
    assert_eq!(t.complete_in_window(2, &mut win, true, |_| None), 0);
    assert_eq!(t.complete_in_window(1, &mut win, true, |_| None), 0);
    // Still the application's: complete it with a buffer.
    t.complete(ok(1), Some((vec![3; 64], 64)), true).unwrap();
    let mut out = [0u8; 200];
    let n = t.transmit(&mut out);
    assert_eq!(&out[..n], &c2h_bytes(1, 0x0C, &[3; 64])[..]);
    assert!(matches!(
        t.poll_event(),
        Some(Event::BufferReleased { cid: 1, .. })
    ));

    // A PDU half-written: nothing may go before its rest.
    read_cmd(&mut t, 2, 64, NONE);
    read_cmd(&mut t, 3, 8, NONE);
    t.complete(ok(2), Some((vec![4; 64], 64)), true).unwrap();
    assert_eq!(t.transmit(&mut out[..30]), 30);
    assert_eq!(
        t.complete_in_window(3, &mut win, true, |_| panic!("called")),
        0
    );
    // A write (host-to-controller data) has nothing to put in the window.
    let w = pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x01, 4, SGL_IN_CAPSULE, 4, 0),
            data_len: 4,
        },
        NONE,
        &[1, 2, 3, 4],
    );
    t.recv(0, &w);
    let mut bufs = 0;
    while let Some(ev) = t.poll_event() {
        match ev {
            Event::NeedBuffer { cid, len } => t.provide_buffer(cid, vec![0; len as usize]).unwrap(),
            Event::Command { .. } => bufs += 1,
            Event::BufferReleased { .. } => {}
            e => panic!("{e:?}"),
        }
        if bufs == 1 {
            break;
        }
    }
    assert_eq!(
        t.complete_in_window(4, &mut win, true, |_| panic!("called")),
        0
    );
}

#[test]
fn an_in_capsule_write_runs_where_it_was_received() {
    let mut t = ready(NONE, 0);
    let w = pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x01, 9, SGL_IN_CAPSULE, 6, 0),
            data_len: 6,
        },
        NONE,
        b"abcdef",
    );
    let mut seen = Vec::new();
    let n = t.recv_direct(0, &w, &mut |sqe: &Sqe, data: &[u8]| {
        seen.push((sqe.cid, data.to_vec()));
        Some(ok(sqe.cid))
    });
    assert_eq!(n, w.len());
    assert_eq!(seen, [(9, b"abcdef".to_vec())]);
    assert!(t.poll_event().is_none(), "no NeedBuffer, no Command");
    let mut out = [0u8; 100];
    let n = t.transmit(&mut out);
    assert_eq!(&out[..n], &resp_bytes(9, 0)[..]);
}

#[test]
fn a_write_with_a_bad_data_digest_never_runs() {
    let dg = Digests {
        header: false,
        data: true,
    };
    let mut t = ready(dg, 0);
    let mut w = pdu(
        &Repr::CapsuleCmd {
            sqe: sqe(0x01, 3, SGL_IN_CAPSULE, 8, 0),
            data_len: 8,
        },
        dg,
        &[7; 8],
    );
    let last = w.len() - 1;
    w[last] ^= 0x40;
    let mut ran = false;
    let mut exec = |_: &Sqe, _: &[u8]| {
        ran = true;
        Some(ok(3))
    };
    let mut rest = &w[..];
    let mut failed = None;
    for _ in 0..4 {
        let n = t.recv_direct(0, rest, &mut exec);
        rest = &rest[n..];
        while let Some(ev) = t.poll_event() {
            match ev {
                Event::NeedBuffer { cid, len } => {
                    t.provide_buffer(cid, vec![0; len as usize]).unwrap()
                }
                Event::CommandFailed { sqe, status, .. } => failed = Some((sqe.cid, status)),
                e => panic!("{e:?}"),
            }
        }
    }
    assert!(rest.is_empty());
    assert!(!ran, "data with a bad digest reached the medium");
    assert_eq!(failed, Some((3, TRANSIENT)));
}

/// Runs `stream` (host PDUs) through a target in segments of the given sizes, executing
/// commands on `disk` (byte offset = CDW10): directly when `direct`, through buffers
/// otherwise. Returns the transmitted bytes. (A direct write runs as it is received, before
/// commands received earlier whose events are still pending: outstanding commands are
/// unordered in NVMe, so the caller gives each command its own bytes of the disk.)
fn run(
    dg: Digests,
    hpda: u8,
    fc: bool,
    stream: &[u8],
    cuts: &[usize],
    direct: bool,
    disk: &mut Vec<u8>,
) -> Vec<u8> {
    let mut t = ready(dg, hpda);
    let mut tx = Vec::new();
    let mut rest = stream;
    let mut cut = cuts.iter().cycle();
    let mut spins = 0;
    while !rest.is_empty() || t.wants_transmit() {
        let k = (*cut.next().unwrap()).clamp(1, rest.len().max(1));
        let seg = &rest[..k.min(rest.len())];
        let n = if direct {
            let d = &mut *disk;
            t.recv_direct(0, seg, &mut |sqe: &Sqe, data: &[u8]| {
                let off = sqe.cdw(10) as usize;
                d[off..off + data.len()].copy_from_slice(data);
                Some(ok(sqe.cid))
            })
        } else {
            t.recv(0, seg)
        };
        rest = &rest[n..];
        while let Some(ev) = t.poll_event() {
            match ev {
                Event::NeedBuffer { cid, len } => {
                    t.provide_buffer(cid, vec![0; len as usize]).unwrap()
                }
                Event::Command { sqe, buf, data_len } => {
                    let off = sqe.cdw(10) as usize;
                    let len = data_len as usize;
                    match buf {
                        Some(b) => {
                            disk[off..off + len].copy_from_slice(&b[..len]);
                            t.complete(ok(sqe.cid), None, fc).unwrap();
                        }
                        None => {
                            let mut win = vec![0u8; 200 + len];
                            let src = &disk[off..off + len];
                            let w = if direct {
                                t.complete_in_window(sqe.cid, &mut win, fc, |dst| {
                                    dst.copy_from_slice(src);
                                    Some((ok(sqe.cid), len as u32))
                                })
                            } else {
                                0
                            };
                            if w > 0 {
                                tx.extend_from_slice(&win[..w]);
                            } else {
                                t.complete(ok(sqe.cid), Some((src.to_vec(), len as u32)), fc)
                                    .unwrap();
                            }
                        }
                    }
                }
                Event::BufferReleased { .. } => {}
                e => panic!("{e:?}"),
            }
        }
        let mut out = [0u8; 777];
        loop {
            let n = t.transmit(&mut out);
            if n == 0 {
                break;
            }
            tx.extend_from_slice(&out[..n]);
        }
        spins = if n == 0 { spins + 1 } else { 0 };
        assert!(spins < 8, "stalled");
    }
    tx
}

proptest! {
    /// The direct paths send the same bytes and leave the same disk as the buffered paths,
    /// with any digests, HPDA, flow-control mode and segmentation.
    #[test]
    fn direct_paths_match_buffered_ones(
        ops in proptest::collection::vec((any::<bool>(), 1u32..3000, 0u32..5000), 1..12),
        hd in any::<bool>(), dd in any::<bool>(), hpda in 0u8..4, fc in any::<bool>(),
        cuts in proptest::collection::vec(1usize..5000, 1..6),
    ) {
        let dg = Digests { header: hd, data: dd };
        let mut stream = Vec::new();
        for (cid, (write, len, off)) in ops.iter().enumerate() {
            let cid = cid as u16;
            let data: Vec<u8> = (0..*len).map(|i| (i as u8) ^ (cid as u8).wrapping_mul(31)).collect();
            // Each write its own 600 bytes of the first 8 KiB, reads from the next 8 KiB
            // (see `run`).
            let (op, id, dl, d, at) = if *write {
                let len = (*len).min(600);
                (0x01, SGL_IN_CAPSULE, len, &data[..len as usize], cid as u32 * 600)
            } else {
                (0x02, SGL_TRANSPORT, 0, &[][..], 8192 + *off)
            };
            stream.extend(pdu(
                &Repr::CapsuleCmd { sqe: sqe(op, cid, id, if *write { dl } else { *len }, at), data_len: dl },
                dg,
                d,
            ));
        }
        let mut a: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 1) as u8).collect();
        let mut b = a.clone();
        let buffered = run(dg, hpda, fc, &stream, &cuts, false, &mut a);
        let direct = run(dg, hpda, fc, &stream, &cuts, true, &mut b);
        prop_assert_eq!(&a, &b);
        // Same PDUs; the direct path may order different commands' PDUs differently.
        let mut x: Vec<&[u8]> = split_pdus(&buffered);
        let mut y: Vec<&[u8]> = split_pdus(&direct);
        x.sort();
        y.sort();
        prop_assert_eq!(x, y);
    }
}

proptest! {
    /// A window in two pieces (a ring's free space where it wraps) gets the same bytes as
    /// one in a piece, wherever it is cut: header and padding before the cut (else nothing
    /// is written and the command is not run), data and digest across it, the response
    /// capsule (with SQ flow control) after the data, continued by `transmit` when it does
    /// not fit the piece it starts in.
    #[test]
    fn a_split_window_holds_the_same_bytes_as_a_whole_one(
        len in 1u32..3000, hd in any::<bool>(), dd in any::<bool>(), hpda in 0u8..4,
        fc in any::<bool>(), cut in 0usize..3300, extra in 0usize..200,
    ) {
        let dg = Digests { header: hd, data: dd };
        let data: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
        let mut t = ready(dg, hpda);
        read_cmd(&mut t, 3, len, dg);
        let mut whole = vec![0u8; 4096];
        let n = t.complete_in_window(3, &mut whole, fc, |dst| {
            dst.copy_from_slice(&data);
            Some((ok(3), len))
        });
        prop_assert!(n > len as usize);
        let want = &whole[..n];

        let mut t = ready(dg, hpda);
        read_cmd(&mut t, 3, len, dg);
        let total = n + extra;
        let cut = cut.min(total);
        let mut buf = vec![0u8; total];
        let (first, second) = buf.split_at_mut(cut);
        let mut pieces = None;
        let m = t.complete_in_split_window(3, (first, second), fc, |a, b| {
            pieces = Some((a.len(), b.len()));
            a.copy_from_slice(&data[..a.len()]);
            b.copy_from_slice(&data[a.len()..]);
            Some((ok(3), len))
        });
        if m == 0 {
            // Only when the header does not fit before the cut; the command is untouched.
            prop_assert!(pieces.is_none());
            prop_assert!(cut < n - len as usize);
            return Ok(());
        }
        let (a, b) = pieces.unwrap();
        prop_assert_eq!(a + b, len as usize);
        let mut got = buf[..m].to_vec();
        let mut rest = [0u8; 256];
        loop {
            let k = t.transmit(&mut rest);
            if k == 0 {
                break;
            }
            got.extend_from_slice(&rest[..k]);
        }
        prop_assert_eq!(&got[..], want);
    }
}
