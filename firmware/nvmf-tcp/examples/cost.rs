//! Instruction cost of the transport per 4 KiB I/O, deterministic: a `HostConnection` and a
//! `TargetConnection` joined in memory, the target's application a RAM disk, QD1, alternating
//! 4 KiB writes (in-capsule) and 4 KiB reads (C2HData + CapsuleResp). Everything the two state
//! machines do per I/O is in the count; sockets, timers and the controller core are not.
//!
//! ```text
//! cargo build --release -p keel-nvmf-tcp --example cost
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/cost 2000
//! valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/cost 4000
//! ```
//!
//! (difference of the two totals) / 2000 = instructions per I/O; add `digests` after the count
//! for header and data digests. README ("Tests and fuzzing") has the figures.

use keel_nvmf_tcp::pdu::Digests;
use keel_nvmf_tcp::{
    Cqe, Event, HostConfig, HostConnection, HostEvent, Sqe, Status, TargetConfig, TargetConnection,
};

type Buf = Vec<u8>;
const BS: usize = 4096;
const DISK: usize = 1 << 20;

fn main() {
    let mut args = std::env::args().skip(1);
    let ios: usize = match args.next().map(|a| a.parse()) {
        Some(Ok(n)) => n,
        None => 1000,
        Some(Err(e)) => {
            eprintln!("usage: cost [IOS] [digests]: {e}");
            std::process::exit(2);
        }
    };
    let on = args.next().is_some_and(|a| a == "digests");
    let digests = Digests {
        header: on,
        data: on,
    };
    let tcfg = TargetConfig {
        slots: 256,
        max_transfer: 128 * 1024,
        ..TargetConfig::default()
    };
    let mut t: TargetConnection<Buf> = TargetConnection::new(tcfg, 0).expect("target config");
    let hcfg = HostConfig {
        slots: 32,
        digests,
        ..HostConfig::default()
    };
    let mut h: HostConnection<Buf> = HostConnection::new(hcfg).expect("host config");
    let mut disk = vec![0u8; DISK];
    // Buffers are recycled, so the loop allocates nothing once it runs.
    let mut pool: Vec<Buf> = (0..8).map(|_| vec![0u8; BS]).collect();
    let mut wire = vec![0u8; 64 * 1024];
    let (mut connected, mut busy) = (false, false);
    let (mut submitted, mut done, mut check) = (0usize, 0usize, 0u64);
    while done < ios {
        if connected && !busy {
            let mut b = pool.pop().expect("pool");
            let off = (submitted * BS % DISK) as u32;
            let write = submitted % 2 == 0;
            if write {
                b.fill(submitted as u8);
            }
            let sqe = Sqe::new(if write { 0x01 } else { 0x02 }, 0).with_cdw(10, off);
            h.submit(sqe, Some((b, BS as u32))).expect("submit");
            submitted += 1;
            busy = true;
        }
        // Host to target.
        loop {
            let k = h.transmit(&mut wire);
            if k == 0 {
                break;
            }
            let mut at = 0;
            while at < k {
                at += t.recv(0, &wire[at..k]);
                serve(&mut t, &mut disk, &mut pool);
            }
        }
        // Target to host.
        loop {
            let k = t.transmit(&mut wire);
            if k == 0 {
                break;
            }
            h.recv(0, &wire[..k]);
            serve(&mut t, &mut disk, &mut pool);
        }
        while let Some(ev) = h.poll_event() {
            match ev {
                HostEvent::Connected { .. } => connected = true,
                HostEvent::Completion { cqe, buf, .. } => {
                    assert!(cqe.status.is_success(), "{}", cqe.status);
                    let b = buf.expect("buffer");
                    check = check.wrapping_add(u64::from(b[7]));
                    pool.push(b);
                    done += 1;
                    busy = false;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    println!("{ios} I/Os (check {check})");
}

/// The target's application: a RAM disk at byte offset CDW10.
fn serve(t: &mut TargetConnection<Buf>, disk: &mut [u8], pool: &mut Vec<Buf>) {
    while let Some(ev) = t.poll_event() {
        match ev {
            Event::NeedBuffer { cid, len } => {
                let b = pool.pop().unwrap_or_else(|| vec![0; len as usize]);
                t.provide_buffer(cid, b).expect("provide_buffer");
            }
            Event::Command { sqe, buf, data_len } => {
                let ok = Cqe::new(sqe.cid, Status::SUCCESS);
                let off = sqe.cdw(10) as usize;
                let len = data_len as usize;
                match (sqe.opcode, buf) {
                    (0x01, Some(b)) => {
                        disk[off..off + len].copy_from_slice(&b[..len]);
                        pool.push(b);
                        t.complete(ok, None, false).expect("complete");
                    }
                    (0x02, _) => {
                        let mut b = pool.pop().expect("pool");
                        b[..len].copy_from_slice(&disk[off..off + len]);
                        t.complete(ok, Some((b, data_len)), false)
                            .expect("complete");
                    }
                    _ => t.complete(ok, None, false).expect("complete"),
                }
            }
            Event::BufferReleased { buf, .. } => pool.push(buf),
            Event::Connected { .. } => {}
            other => panic!("{other:?}"),
        }
    }
}
