//! Faults from the network: a fault-injecting proxy (`keel_tests::proxy`) between the
//! NVMe/TCP initiator and the real image in QEMU delays, splits, coalesces, stalls, truncates
//! and resets the host's connections while it writes.
//!
//! After each case:
//! - a host that reconnects (directly) reads back every write that was acknowledged;
//! - the target is back at rest: buffer pools, sockets, connections and controllers at their
//!   idle counts in the management status (it never hangs, never leaks).
//!
//! With the faults that keep the connection (delay, split, coalesce, stall) every write
//! succeeds and reads back through the proxy as well.

use keel_host_tools::nvme::{Controller, IoQueue, Params};
use keel_nvme::io::RwCommand;
use keel_nvme::{IoOpcode, Status};
use keel_tests::proxy::{Fault, FaultProxy};
use keel_tests::{assert_back_at_rest, boot_ram_device, mgmt_status, wait_idle};
use std::time::Duration;

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:fa017000-0000-4000-8000-000000000001";
const BS: u32 = 512;
const NLB: u32 = 16;
const WRITES: u64 = 48;

fn connect(addr: &str) -> Result<(Controller, IoQueue), String> {
    let p = Params {
        timeout: Duration::from_secs(20),
        ..Params::new(addr, SUBNQN, HOSTNQN)
    };
    let c = Controller::connect(p).map_err(|e| format!("connect: {e}"))?;
    let q = c.io_queue(1, 8).map_err(|e| format!("I/O queue: {e}"))?;
    Ok((c, q))
}

/// The data of write `i` of case `case`: every byte says which.
fn data(case: u64, i: u64) -> Vec<u8> {
    let mut d = vec![0u8; (NLB * BS) as usize];
    for (j, b) in d.iter_mut().enumerate() {
        *b = (case * 31 + i * 7 + j as u64 / 512) as u8;
    }
    d
}

fn lba(case: u64, i: u64) -> u64 {
    (case * WRITES + i) * NLB as u64
}

/// Writes until `WRITES` are done or the connection fails; returns the acknowledged ones.
fn write_all(q: &mut IoQueue, case: u64) -> (Vec<u64>, Option<String>) {
    let mut acked = Vec::new();
    for i in 0..WRITES {
        let sqe = RwCommand::simple(lba(case, i), NLB).to_sqe(IoOpcode::Write as u8, 0, 1);
        let r = q
            .submit_command(sqe, Some((data(case, i), NLB * BS)))
            .and_then(|_| q.next_completion());
        match r {
            Ok((_, done)) if done.cqe.status == Status::SUCCESS => acked.push(i),
            Ok((_, done)) => return (acked, Some(format!("write {i}: {:?}", done.cqe.status))),
            Err(e) => return (acked, Some(format!("write {i}: {e}"))),
        }
    }
    (acked, None)
}

fn check(q: &mut IoQueue, case: u64, acked: &[u64]) -> Result<(), String> {
    for &i in acked {
        let got = q
            .read(1, lba(case, i), NLB as u64, BS)
            .map_err(|e| format!("read {i}: {e}"))?;
        if got != data(case, i) {
            return Err(format!(
                "acknowledged write {i} of case {case} does not read back"
            ));
        }
    }
    Ok(())
}

#[test]
fn a_hostile_network_neither_hangs_nor_leaks_the_target_nor_loses_acknowledged_writes() {
    let (q, port, mgmt) = boot_ram_device(16);
    let target = format!("127.0.0.1:{port}").parse().expect("address");
    let idle = mgmt_status(&mgmt);

    let ms = Duration::from_millis;
    // (fault, whether the connection survives it)
    let cases = [
        (Fault::Delay(ms(30)), true),
        (Fault::Split(7), true),
        (Fault::Coalesce(ms(40)), true),
        (
            Fault::Stall {
                after: 40_000,
                pause: ms(3000),
            },
            true,
        ),
        (Fault::Truncate { after: 50_000 }, false),
        (Fault::Truncate { after: 100_003 }, false),
        (Fault::Reset { after: 60_000 }, false),
        (Fault::Reset { after: 120_001 }, false),
    ];
    let mut report = Vec::new();
    for (case, (fault, survives)) in cases.into_iter().enumerate() {
        let case = case as u64;
        let proxy = FaultProxy::start(target, fault, 1);
        let (acked, err) = match connect(&proxy.addr()) {
            Ok((c, mut io)) => {
                let (acked, err) = write_all(&mut io, case);
                if survives {
                    assert_eq!(err, None, "{fault:?}");
                    check(&mut io, case, &acked).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
                    let _ = io.close();
                    let _ = c.close();
                } else {
                    assert!(
                        err.is_some(),
                        "{fault:?}: the connection outlived the fault"
                    );
                }
                (acked, err)
            }
            Err(e) => panic!("{fault:?}: the admin queue is spared, yet: {e}"),
        };
        drop(proxy);
        // A host that reconnects finds every acknowledged write.
        let (c, mut io) = connect(&format!("127.0.0.1:{port}"))
            .unwrap_or_else(|e| panic!("reconnecting after {fault:?}: {e}"));
        check(&mut io, case, &acked).unwrap_or_else(|e| panic!("after {fault:?}: {e}"));
        let _ = io.close();
        let _ = c.close();
        wait_idle(&mgmt, &idle, Duration::from_secs(60));
        report.push(format!("{fault:?}: {} acknowledged ({err:?})", acked.len()));
    }
    eprintln!("network faults survived:\n  {}", report.join("\n  "));
    assert_back_at_rest(&q, &mgmt, &idle);
}
