//! Fuzz harnesses for keel-nvmf-tcp, shared by the cargo-fuzz targets and the crate's own test
//! suite (`tests/fuzz_harness.rs` includes this file).
//!
//! `target_recv`: arbitrary bytes (optionally after a valid ICReq) fed to a `TargetConnection`
//! in varying segment sizes, with an application that provides buffers (sometimes late),
//! completes commands and drains `transmit`; some segments go through `recv_direct` (writes
//! run from the receive window) and some reads complete through `complete_in_window`.
//! Asserts: no panic, the connection's memory stays what `new` allocated, requested buffers
//! and directly delivered data never exceed the configured limits, and everything it
//! transmits is a well-formed controller-to-host PDU stream.

use keel_nvmf_tcp::pdu::{Digests, Repr, encode_pdu};
use keel_nvmf_tcp::{
    Cqe, DataDirection, Event, HostConfig, HostConnection, HostEvent, Sqe, Status, TargetConfig,
    TargetConnection,
};

fn icreq(dg: Digests, hpda: u8) -> [u8; 128] {
    let mut b = [0u8; 128];
    let r = Repr::IcReq {
        pfv: 0,
        hpda,
        digests: dg,
        maxr2t: 1,
    };
    let _ = encode_pdu(&mut b, &r, Digests::default(), 0, &[]);
    b
}

/// Check that `tx` is a sequence of well-formed C2H PDUs (the last may be incomplete).
fn check_c2h_stream(tx: &[u8]) {
    let mut at = 0;
    while at + 8 <= tx.len() {
        let ty = tx[at];
        let hlen = tx[at + 2] as usize;
        let plen = u32::from_le_bytes([tx[at + 4], tx[at + 5], tx[at + 6], tx[at + 7]]) as usize;
        let want_hlen = match ty {
            0x01 => 128,
            0x03 | 0x05 | 0x07 | 0x09 => 24,
            _ => panic!("target sent PDU type {ty:#x}"),
        };
        assert_eq!(hlen, want_hlen);
        assert!(plen >= hlen);
        at += plen;
    }
}

/// Target fuzz body.
pub fn target_recv(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let cfg = TargetConfig {
        maxh2cdata: 4096,
        max_c2h_data: 512 + (mode as u32 & 7) * 512,
        max_transfer: 64 * 1024,
        slots: 16,
        initial_queue_depth: 8,
        ..TargetConfig::default()
    };
    let max_buf = cfg.in_capsule_data.max(cfg.max_transfer);
    let mut t: TargetConnection<Vec<u8>> = TargetConnection::new(cfg, 0).unwrap();
    let footprint = t.memory_footprint();
    let mut stream = Vec::with_capacity(rest.len() + 128);
    if mode & 0x80 != 0 {
        let dg = Digests {
            header: mode & 0x40 != 0,
            data: mode & 0x20 != 0,
        };
        stream.extend_from_slice(&icreq(dg, mode & 3));
    }
    stream.extend_from_slice(rest);
    let hold = mode & 0x10 != 0;
    let mut held: Vec<(u16, u32)> = Vec::new();
    let mut tx = Vec::new();
    let mut out = [0u8; 777];
    let mut seed = mode as u32 | 1;
    let mut input = &stream[..];
    let mut now = 0u64;
    while !input.is_empty() {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let n = (1 + (seed >> 16) as usize % 300).min(input.len());
        let mut piece = &input[..n];
        input = &input[n..];
        now += 1;
        let mut stalls = 0;
        let direct = (seed >> 8) & 1 != 0;
        while !piece.is_empty() {
            let c = if direct {
                t.recv_direct(now, piece, &mut |sqe: &Sqe, d: &[u8]| {
                    assert!(d.len() as u32 <= cfg.in_capsule_data, "{} bytes", d.len());
                    // Odd CIDs run, even ones take the buffered path.
                    (sqe.cid & 1 == 1).then(|| Cqe::new(sqe.cid, Status::SUCCESS))
                })
            } else {
                t.recv(now, piece)
            };
            assert!(c <= piece.len());
            piece = &piece[c..];
            if c == 0 {
                stalls += 1;
                // Provide everything held back, then give up on a persistent stall.
                for (cid, len) in held.drain(..) {
                    let _ = t.provide_buffer(cid, vec![0; len as usize]);
                }
                if stalls > 3 {
                    return;
                }
            }
            service(&mut t, hold, &mut held, max_buf, &mut tx);
            loop {
                let k = t.transmit(&mut out);
                assert!(k <= out.len());
                if k == 0 {
                    break;
                }
                tx.extend_from_slice(&out[..k]);
                service(&mut t, hold, &mut held, max_buf, &mut tx);
            }
            assert_eq!(t.memory_footprint(), footprint);
        }
    }
    for (cid, len) in held.drain(..) {
        let _ = t.provide_buffer(cid, vec![0; len as usize]);
    }
    service(&mut t, false, &mut held, max_buf, &mut tx);
    while t.transmit(&mut out) > 0 {}
    check_c2h_stream(&tx);
    assert_eq!(t.memory_footprint(), footprint);
}

fn service(
    t: &mut TargetConnection<Vec<u8>>,
    hold: bool,
    held: &mut Vec<(u16, u32)>,
    max_buf: u32,
    tx: &mut Vec<u8>,
) {
    let mut toggle = false;
    while let Some(ev) = t.poll_event() {
        match ev {
            Event::NeedBuffer { cid, len } => {
                assert!(len <= max_buf, "buffer of {len} requested");
                toggle = !toggle;
                if hold && toggle {
                    held.push((cid, len));
                } else {
                    let _ = t.provide_buffer(cid, vec![0; len as usize]);
                }
            }
            Event::Command { sqe, data_len, .. } => {
                let cqe = Cqe::new(sqe.cid, Status::SUCCESS);
                let fc_off = (sqe.nsid >> 8) & 1 != 0;
                // SQE byte 5 bit 1: complete a read in a window of CDW10's low byte × 64
                // bytes (when it fits), failing it when bit 2 is set too.
                if sqe.nsid & 0x200 != 0 && sqe.data_direction() == DataDirection::ControllerToHost
                {
                    let mut win = vec![0u8; (sqe.cdw(10) & 0xFF) as usize * 64];
                    let fail = sqe.nsid & 0x400 != 0;
                    let n = t.complete_in_window(sqe.cid, &mut win, fc_off, |dst| {
                        assert_eq!(dst.len() as u32, data_len);
                        dst.fill(0x5A);
                        Some(if fail {
                            (Cqe::new(sqe.cid, Status::LBA_OUT_OF_RANGE), 0)
                        } else {
                            (cqe, data_len)
                        })
                    });
                    tx.extend_from_slice(&win[..n]);
                    if n > 0 {
                        continue;
                    }
                }
                let data = match sqe.data_direction() {
                    DataDirection::ControllerToHost if data_len > 0 => {
                        let l = data_len.min(8192);
                        Some((vec![0xA5; l as usize], l))
                    }
                    _ => None,
                };
                // SQE byte 5 bit 0 decides whether SQ flow control is "disabled".
                let _ = t.complete(cqe, data, fc_off);
            }
            Event::CommandFailed { sqe, status, .. } => {
                let _ = t.complete(Cqe::new(sqe.cid, status), None, false);
            }
            Event::BufferReleased { .. } | Event::Connected { .. } | Event::Closed { .. } => {}
        }
    }
}

/// Host fuzz body: arbitrary controller bytes to a HostConnection with a few commands queued.
pub fn host_recv(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dg = Digests {
        header: mode & 0x40 != 0,
        data: mode & 0x20 != 0,
    };
    let mut h: HostConnection<Vec<u8>> = HostConnection::new(HostConfig {
        digests: dg,
        hpda: mode & 3,
        maxr2t: 3,
        slots: 8,
        in_capsule_limit: 512,
        // Both ways: a SUCCESS flag in the fuzzed stream is then accepted or fatal.
        sq_flow_control_disabled: mode & 0x10 != 0,
    })
    .unwrap();
    let mut out = [0u8; 600];
    while h.transmit(&mut out) > 0 {}
    let mut stream = Vec::new();
    if mode & 0x80 != 0 {
        let mut b = [0u8; 128];
        let r = Repr::IcResp {
            pfv: 0,
            cpda: 0,
            digests: dg,
            maxh2cdata: 4096,
        };
        let _ = encode_pdu(&mut b, &r, Digests::default(), 0, &[]);
        stream.extend_from_slice(&b);
    }
    stream.extend_from_slice(rest);
    let mut input = &stream[..];
    let mut submitted = false;
    while !input.is_empty() {
        let n = (1 + (input[0] as usize % 97)).min(input.len());
        assert_eq!(h.recv(0, &input[..n]), n);
        input = &input[n..];
        while let Some(ev) = h.poll_event() {
            if let HostEvent::Connected { .. } = ev
                && !submitted
            {
                submitted = true;
                for (i, op) in [0x01u8, 0x02, 0x01, 0x00].into_iter().enumerate() {
                    let s = Sqe::new(op, 0);
                    let len = [100u32, 5000, 9000, 0][i];
                    let _ = h.submit(s, Some((vec![0; len as usize], len)));
                }
            }
        }
        while h.transmit(&mut out) > 0 {}
    }
}
