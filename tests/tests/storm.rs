//! Connection storms against the real image in QEMU: bursts of 64 TCP connections opened at
//! once and closed (or left idle) without an ICReq, while a legitimate host connects again and
//! again. Every one of the legitimate host's associations must succeed, and afterwards the
//! target's connection slots and buffer pools are back to idle (management status).
//!
//! What makes it hold (firmware/src/net.rs, firmware/src/nvmf.rs): listeners are re-armed
//! between received packets (a burst of SYNs never finds every listener taken), closed sockets
//! go back to the pool at once, connections that never send an ICReq time out, and when the
//! pool has no socket left for a listener the oldest connection still waiting for its ICReq is
//! evicted.
//!
//! What is not Keel's: QEMU's user network listens on the host with a backlog of one, so a
//! storm of 64 connects overflows the host kernel's accept queue (`nstat TcpExtListenOverflows`
//! grows by thousands in one run of this file). A connection the kernel keeps in SYN-RECV looks
//! established to the client while QEMU has not accepted it and Keel has not seen it; its ICReq
//! waits for the kernel's SYN-ACK retransmissions (1, 3, 7, 15 s). The legitimate host
//! therefore starts its association again when no ICResp came at all (as nvme-cli's user would
//! run `nvme connect` again); anything Keel does to the connection (a reset, a close, a
//! TermReq, an error status) still fails the test.

use keel_host_tools::nvme::{Controller, NvmeError, Params};
use keel_tests::{Qemu, assert_back_at_rest, boot_ram_device, mgmt_status};
use std::net::TcpStream;
use std::time::Duration;

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:5707a1e5-0000-4000-8000-000000000064";

fn boot() -> (Qemu, u16, String) {
    boot_ram_device(16)
}

fn params(port: u16) -> Params {
    Params {
        timeout: Duration::from_secs(20),
        ..Params::new(format!("127.0.0.1:{port}"), SUBNQN, HOSTNQN)
    }
}

/// Connection attempts whose ICResp never came (see the module's note on QEMU's backlog).
const ATTEMPTS: usize = 3;

/// One legitimate association: connect (ICReq, Connect, enable, Identify), an I/O queue with a
/// write and a read back, then an orderly close. Returns why it failed, if it did.
fn legitimate(port: u16, n: u32) -> Result<(), String> {
    let mut attempt = 1;
    let c = loop {
        match Controller::connect(params(port)) {
            Ok(c) => break c,
            Err(NvmeError::Timeout { what, .. })
                if what.starts_with("ICResp") && attempt < ATTEMPTS =>
            {
                eprintln!("association {n}: no ICResp (attempt {attempt}), connecting again");
                attempt += 1;
            }
            Err(e) => return Err(format!("connect (attempt {attempt}): {e}")),
        }
    };
    let mut q = c.io_queue(1, 4).map_err(|e| format!("I/O queue: {e}"))?;
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ (n as u8)).collect();
    let lba = u64::from(n % 1024) * 8;
    q.write(1, lba, &data, 512)
        .map_err(|e| format!("write: {e}"))?;
    let back = q.read(1, lba, 8, 512).map_err(|e| format!("read: {e}"))?;
    if back != data {
        return Err("read back differs".into());
    }
    q.close().map_err(|e| format!("I/O queue close: {e}"))?;
    c.close().map_err(|e| format!("close: {e}"))
}

/// Opens `n` connections at once, one thread each (QEMU's user network accepts host
/// connections one at a time with a backlog of one, so sequential connects would trickle in).
fn open_many(port: u16, n: usize) -> Vec<TcpStream> {
    let threads: Vec<_> = (0..n)
        .map(|_| {
            std::thread::spawn(move || {
                TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(10),
                )
                .ok()
            })
        })
        .collect();
    threads
        .into_iter()
        .filter_map(|t| t.join().ok().flatten())
        .collect()
}

#[test]
fn storms_of_connections_without_icreq_never_turn_a_host_away() {
    let (q, port, mgmt) = boot();
    let idle = mgmt_status(&mgmt);

    // Each round a storm of 64 connections starts while the host connects; the storm's
    // connections are closed without an ICReq once all are open.
    let rounds = 10;
    let mut failures = Vec::new();
    let mut stormed = 0;
    for n in 0..rounds {
        let storm = std::thread::spawn(move || open_many(port, 64).len());
        if let Err(e) = legitimate(port, n) {
            failures.push(format!("association {n}: {e}"));
        }
        stormed += storm.join().unwrap();
    }
    eprintln!(
        "{rounds} associations during storms ({stormed} connections in all): {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");

    // Right after a storm, too (no pause at all).
    for n in 0..5 {
        drop(open_many(port, 64));
        legitimate(port, 100 + n).unwrap_or_else(|e| panic!("after storm {n}: {e}"));
    }
    assert_back_at_rest(&q, &mgmt, &idle);
}

#[test]
fn idle_connections_holding_every_socket_are_evicted_for_a_host() {
    let (q, port, mgmt) = boot();
    let idle = mgmt_status(&mgmt);
    // Silent connections, never closed by us, until the target runs out of sockets and
    // evicts the oldest (QEMU's user network hands them to the target a few at a time).
    let mut held = Vec::new();
    while mgmt_status(&mgmt).resources.evicted == 0 {
        assert!(
            held.len() < 640,
            "{} silent connections and no eviction",
            held.len()
        );
        held.extend(open_many(port, 32));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The host still gets in, again and again, while more silent ones keep coming.
    for n in 0..5 {
        let more = std::thread::spawn(move || open_many(port, 16));
        legitimate(port, n).unwrap_or_else(|e| panic!("association {n} among idle ones: {e}"));
        held.extend(more.join().unwrap());
    }
    let during = mgmt_status(&mgmt);
    eprintln!(
        "{} silent connections held: {:?}",
        held.len(),
        during.resources
    );
    drop(held);
    assert_back_at_rest(&q, &mgmt, &idle);
}
