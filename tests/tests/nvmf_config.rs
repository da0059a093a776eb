//! The development configuration from boot arguments, end to end through NVMe/TCP: several
//! namespaces with 4096-byte blocks, a custom subsystem NQN, and an allowed-hosts list that
//! refuses other hosts with Connect Invalid Host (NVMe-oF 1.1 §3.3, SCT 1h SC 84h).

use keel_host_tools::nvme::{Controller, NvmeError, Params};
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, free_port};
use std::time::Duration;

const NQN: &str = "nqn.2026-11.dev.keel:tenant-a";
const ALLOWED: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const OTHER: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";

fn params(port: u16, hostnqn: &str) -> Params {
    Params {
        timeout: Duration::from_secs(30),
        ..Params::new(format!("127.0.0.1:{port}"), NQN, hostnqn)
    }
}

#[test]
fn namespaces_block_size_nqn_and_allowed_hosts_from_boot_arguments() {
    let port = free_port();
    let append = format!("keel.ram=16,8 keel.bs=4096 keel.nqn={NQN} keel.allow={ALLOWED}");
    let mut q = Qemu::boot(
        Build::Release,
        &["--nvmf-port", &port.to_string(), "--append", &append],
    );
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    // A host that is not on the list is refused at Connect.
    match Controller::connect(params(port, OTHER)) {
        Err(e @ NvmeError::Status { .. }) => {
            let st = e.status().expect("a status");
            assert_eq!((st.sct, st.sc), (1, 0x84), "{e}");
        }
        Err(e) => panic!("expected Connect Invalid Host, got {e}"),
        Ok(_) => panic!("a host outside keel.allow was accepted"),
    }

    // The listed host gets both namespaces, with 4096-byte blocks, and its data.
    let ctrl = Controller::connect(params(port, ALLOWED)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2]);
    let ns1 = ctrl.identify_namespace(1).unwrap();
    let ns2 = ctrl.identify_namespace(2).unwrap();
    assert_eq!(ns1.block_size(), 4096);
    assert_eq!(ns1.nsze, (16 << 20) / 4096);
    assert_eq!(ns2.nsze, (8 << 20) / 4096);
    assert_ne!(ns1.nguid, ns2.nguid);
    ctrl.set_io_queues(1).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();
    let a: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let b: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 241) as u8).collect();
    io.write(1, 3, &a, 4096).unwrap();
    io.write(2, 3, &b, 4096).unwrap();
    assert_eq!(io.read(1, 3, 2, 4096).unwrap(), a);
    assert_eq!(io.read(2, 3, 2, 4096).unwrap(), b);
    drop(io);
    ctrl.close().unwrap();
}
