//! HostConnection and TargetConnection talking through byte pipes with random segmentation:
//! in-capsule writes, R2T-driven writes (multi-R2T), multi-C2HData reads, with and without
//! digests, HPDA padding and the SUCCESS optimisation.

mod common;
use common::*;
use keel_nvmf_tcp::host::HostState;
use keel_nvmf_tcp::pdu::Digests;
use keel_nvmf_tcp::{
    HostConfig, HostConnection, HostEvent, Sqe, Status, TargetConfig, TargetState,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

#[derive(Clone, Copy)]
struct Params {
    seed: u64,
    digests: Digests,
    hpda: u8,
    maxr2t: u32,
    fc_disabled: bool,
    in_capsule_limit: u32,
    max_c2h: u32,
}

const SIZES: [u32; 9] = [1, 512, 4096, 8192, 8193, 12000, 20000, 70000, 3];

fn run(p: Params) {
    let mut rng = Rng(p.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut t = target(TargetConfig {
        maxh2cdata: 4096,
        max_c2h_data: p.max_c2h,
        max_r2t: 4,
        ..TargetConfig::default()
    });
    let mut app = App::new();
    app.fc_disabled = p.fc_disabled;
    let mut h: HostConnection<Buf> = HostConnection::new(HostConfig {
        hpda: p.hpda,
        digests: p.digests,
        maxr2t: p.maxr2t,
        slots: 32,
        in_capsule_limit: p.in_capsule_limit,
        sq_flow_control_disabled: p.fc_disabled,
    })
    .unwrap();
    let mut h2t: Vec<u8> = Vec::new();
    let mut t2h: Vec<u8> = Vec::new();
    let mut offsets = Vec::new();
    let mut off = 0u32;
    for &s in &SIZES {
        offsets.push((off, s));
        off += s + 100;
    }
    let pattern = |o: u32, i: usize| ((o as usize + i) * 7 + p.seed as usize) as u8;
    let mut phase = 0; // 0 connect, 1 writes, 2 reads, 3 done
    let mut outstanding = 0;
    let mut steps = 0;
    while phase < 3 {
        steps += 1;
        assert!(
            steps < 200_000,
            "no progress: phase {phase} outstanding {outstanding}"
        );
        // host -> target
        let mut out = vec![0u8; rng.range(1, 3000)];
        let k = h.transmit(&mut out);
        h2t.extend_from_slice(&out[..k]);
        while !h2t.is_empty() {
            let piece = rng.range(1, 2500).min(h2t.len());
            let c = t.recv(0, &h2t[..piece]);
            h2t.drain(..c);
            app.service(&mut t);
            if c < piece {
                let c2 = t.recv(0, &h2t[..piece - c]);
                h2t.drain(..c2);
                app.service(&mut t);
                if c2 == 0 {
                    break;
                }
            }
        }
        // target -> host
        let mut out = vec![0u8; rng.range(1, 3000)];
        let k = t.transmit(&mut out);
        t2h.extend_from_slice(&out[..k]);
        app.service(&mut t);
        while !t2h.is_empty() {
            let piece = rng.range(1, 2500).min(t2h.len());
            let c = h.recv(0, &t2h[..piece]);
            assert_eq!(c, piece);
            t2h.drain(..c);
        }
        while let Some(ev) = h.poll_event() {
            match ev {
                HostEvent::Connected {
                    maxh2cdata,
                    digests,
                } => {
                    assert_eq!(maxh2cdata, 4096);
                    assert_eq!(digests, p.digests);
                    // Fabrics Connect with 1 KiB in-capsule data.
                    h.submit(Sqe::fabrics(0x01, 0), Some((vec![0xC0; 1024], 1024)))
                        .unwrap();
                    outstanding = 1;
                }
                HostEvent::Completion { cqe, buf, cid } => {
                    assert_eq!(
                        (cqe.status, cqe.phase),
                        (Status::SUCCESS, false),
                        "status of cid {cid}"
                    );
                    assert_eq!(cqe.cid, cid);
                    outstanding -= 1;
                    if phase == 2 {
                        let b = buf.unwrap();
                        let o = u32::from_le_bytes(b[b.len() - 4..].try_into().unwrap());
                        let len = b.len() - 4;
                        for (i, &v) in b[..len].iter().enumerate() {
                            assert_eq!(v, pattern(o, i), "read data at {o}+{i}");
                        }
                    }
                }
                HostEvent::Closed { reason } => panic!("host closed: {reason}"),
                HostEvent::Aborted { cid, .. } => panic!("aborted {cid}"),
            }
        }
        if outstanding == 0 && h.state() == HostState::Ready {
            phase += 1;
            if phase == 1 {
                for &(o, len) in &offsets {
                    let data: Vec<u8> = (0..len as usize).map(|i| pattern(o, i)).collect();
                    h.submit(Sqe::new(0x01, 0).with_cdw(10, o), Some((data, len)))
                        .unwrap();
                    outstanding += 1;
                }
            } else if phase == 2 {
                for &(o, len) in &offsets {
                    // Extra 4 bytes at the end remember the offset for checking.
                    let mut b = vec![0u8; len as usize + 4];
                    b[len as usize..].copy_from_slice(&o.to_le_bytes());
                    h.submit(Sqe::new(0x02, 0).with_cdw(10, o), Some((b, len)))
                        .unwrap();
                    outstanding += 1;
                }
            }
        }
        assert!(
            matches!(t.state(), TargetState::Ready | TargetState::AwaitIc),
            "target log: {:?}",
            app.log
        );
    }
    assert!(!app.log.iter().any(|l| l.starts_with("failed")));
    // Writes above the in-capsule limit went through R2T, others in-capsule.
    let needs = app.log.iter().filter(|l| l.starts_with("need")).count();
    assert_eq!(needs, 1 + SIZES.len());
}

#[test]
fn host_and_target_random_segmentation() {
    let mut n = 0;
    for seed in 0..12u64 {
        for (header, data) in [(false, false), (true, true), (true, false), (false, true)] {
            n += 1;
            run(Params {
                seed,
                digests: Digests { header, data },
                hpda: (seed % 4) as u8 * 3,
                maxr2t: (seed % 3) as u32,
                fc_disabled: seed % 2 == 1,
                in_capsule_limit: if seed % 5 == 0 { 0 } else { 8192 },
                max_c2h: [512, 1000, 4096, 65536][(seed % 4) as usize],
            });
        }
    }
    assert_eq!(n, 48);
}

#[test]
fn host_rejects_bad_icresp_and_terminates() {
    let mut h: HostConnection<Buf> = HostConnection::new(HostConfig::default()).unwrap();
    let mut out = [0u8; 256];
    assert_eq!(h.transmit(&mut out), 128);
    // ICResp with MAXH2CDATA 1000 (< 4096): invalid field at byte 12.
    let mut r = vec![0x01, 0x00, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00];
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&1000u32.to_le_bytes());
    r.resize(128, 0);
    h.recv(0, &r);
    let n = h.transmit(&mut out);
    let mut want = term_req(1, 12, &r);
    want[0] = 0x02; // H2CTermReq
    assert_eq!(&out[..n], &want[..]);
    assert_eq!(h.state(), HostState::Closed);
}

fn host_ready(dg: Digests, maxh2cdata: u32) -> HostConnection<Buf> {
    use keel_nvmf_tcp::pdu::Repr;
    let mut h: HostConnection<Buf> = HostConnection::new(HostConfig {
        digests: dg,
        in_capsule_limit: 0,
        ..HostConfig::default()
    })
    .unwrap();
    let mut out = [0u8; 256];
    assert_eq!(h.transmit(&mut out), 128);
    let r = pdu(
        &Repr::IcResp {
            pfv: 0,
            cpda: 0,
            digests: dg,
            maxh2cdata,
        },
        Digests::default(),
        &[],
    );
    assert_eq!(h.recv(0, &r), 128);
    assert!(matches!(h.poll_event(), Some(HostEvent::Connected { .. })));
    h
}

#[test]
fn host_splits_h2c_data_at_maxh2cdata() {
    use keel_nvmf_tcp::pdu::Repr;
    let dg = Digests {
        header: true,
        data: true,
    };
    let mut h = host_ready(dg, 4096);
    let data: Vec<u8> = (0..10000u32).map(|i| i as u8).collect();
    let cid = h
        .submit(Sqe::new(0x01, 0), Some((data.clone(), 10000)))
        .unwrap();
    let mut out = vec![0u8; 20000];
    let n = h.transmit(&mut out);
    assert_eq!(n, 72 + 4, "capsule without in-capsule data");
    assert_eq!(out[8 + 39], 0x5A, "transport SGL");
    let r2t = pdu(
        &Repr::R2T {
            cccid: cid,
            ttag: 0x77,
            offset: 0,
            len: 10000,
        },
        dg,
        &[],
    );
    h.recv(0, &r2t);
    let n = h.transmit(&mut out);
    let mut want = Vec::new();
    for (off, len) in [(0u32, 4096u32), (4096, 4096), (8192, 1808)] {
        want.extend(pdu(
            &Repr::H2CData {
                cccid: cid,
                ttag: 0x77,
                offset: off,
                len,
                last: off == 8192,
            },
            dg,
            &data[off as usize..(off + len) as usize],
        ));
    }
    assert_eq!(&out[..n], &want[..]);
}

#[test]
fn host_c2h_data_digest_error_reports_transient_error() {
    use keel_nvmf_tcp::pdu::Repr;
    let dg = Digests {
        header: false,
        data: true,
    };
    let mut h = host_ready(dg, 4096);
    let cid = h
        .submit(Sqe::new(0x02, 0), Some((vec![0; 64], 64)))
        .unwrap();
    let mut out = [0u8; 256];
    h.transmit(&mut out);
    let mut d = pdu(
        &Repr::C2HData {
            cccid: cid,
            offset: 0,
            len: 64,
            last: true,
            success: false,
        },
        dg,
        &[1; 64],
    );
    let n = d.len();
    d[n - 1] ^= 1;
    h.recv(0, &d);
    h.recv(0, &pdu(&Repr::CapsuleResp { cqe: cqe(cid, 0) }, dg, &[]));
    match h.poll_event() {
        Some(HostEvent::Completion { cqe, .. }) => {
            assert_eq!(
                (cqe.status, cqe.phase),
                (Status::TRANSIENT_TRANSPORT_ERROR, false)
            );
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(h.state(), HostState::Ready);
}

#[test]
fn host_rejects_unsolicited_c2h_data() {
    use keel_nvmf_tcp::pdu::Repr;
    let mut h = host_ready(Digests::default(), 4096);
    let d = pdu(
        &Repr::C2HData {
            cccid: 3,
            offset: 0,
            len: 4,
            last: true,
            success: false,
        },
        Digests::default(),
        &[1; 4],
    );
    h.recv(0, &d);
    let mut out = [0u8; 256];
    let n = h.transmit(&mut out);
    let mut want = term_req(1, 8, &d[..24]);
    want[0] = 0x02;
    assert_eq!(&out[..n], &want[..]);
}
