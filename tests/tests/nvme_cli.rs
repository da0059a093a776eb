//! `keelctl nvme` against the release firmware in QEMU: the real `keelctl` binary for the
//! commands and their output, the initiator library (`keel_host_tools::nvme`) where a test
//! needs the exact NVMe status. Every QEMU and every `keelctl` run is bounded in time.

use keel_host_tools::nvme::{Controller, IoKind, NvmeError, Params, default_host_identity};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, Run, ScratchFile, free_port, keelctl, noise, run_keelctl,
};
use std::time::Duration;

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// The default namespace: 256 MiB of 512-byte blocks.
const NSZE: u64 = (256 << 20) / 512;

/// Runs `keelctl nvme ARGS`, killing it after the harness's bound.
fn nvme(args: &[&str]) -> Run {
    let mut all = vec!["nvme"];
    all.extend_from_slice(args);
    run_keelctl(None, &all)
}

fn ok(args: &[&str]) -> Run {
    let r = nvme(args);
    assert_eq!(r.code, 0, "keelctl nvme {args:?} failed: {}", r.stderr);
    r
}

/// Boots the release firmware with these `qemu/run` options and waits for `keel: ready`.
fn boot(opts: &[&str]) -> Qemu {
    // Build keelctl before QEMU starts its clock.
    keelctl();
    let mut q = Qemu::boot(Build::Release, opts);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    q
}

/// Boots with the NVMe/TCP port forwarded; returns QEMU and "127.0.0.1:PORT".
fn boot_nvmf() -> (Qemu, String) {
    let port = free_port();
    let q = boot(&["--nvmf-port", &port.to_string()]);
    (q, format!("127.0.0.1:{port}"))
}

fn params(addr: &str) -> Params {
    let (hostnqn, hostid) = default_host_identity();
    Params {
        hostid,
        kato: Duration::from_secs(10),
        timeout: Duration::from_secs(30),
        ..Params::new(addr, SUBNQN, &hostnqn)
    }
}

#[test]
fn nvme_discover_lists_the_default_subsystem() {
    // Only the discovery port: the firmware then advertises its own address and port.
    let port = free_port();
    let _q = boot(&["--discovery-port", &port.to_string()]);
    let addr = format!("127.0.0.1:{port}");
    let r = ok(&["discover", "--addr", &addr]);
    for line in [
        "Discovery Log: 1 record(s)",
        "trtype:  tcp",
        "adrfam:  ipv4",
        "subtype: nvme subsystem",
        &format!("traddr:  {}", keel_tests::guest_address_prefix()),
        "trsvcid: 4420",
        "subnqn:  nqn.2026-11.dev.keel:default",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing:\n{}", r.stdout);
    }
    let r = ok(&["discover", "--addr", &addr, "--json", "--digests", "both"]);
    for field in [
        "\"numrec\": 1",
        &format!("\"traddr\": \"{}", keel_tests::guest_address_prefix()),
        "\"trsvcid\": \"4420\"",
        "\"subnqn\": \"nqn.2026-11.dev.keel:default\"",
    ] {
        assert!(r.stdout.contains(field), "{field} missing:\n{}", r.stdout);
    }
}

#[test]
fn nvme_identify_reports_the_ram_namespace() {
    let (_q, addr) = boot_nvmf();
    let r = ok(&["identify", "--addr", &addr]);
    for line in [
        "subnqn    nqn.2026-11.dev.keel:default",
        "mn        Keel NVMe/TCP target",
        "cntrltype io",
        "Namespace 1",
        "nsze       524288 blocks (256 MiB)",
        "block size 512",
    ] {
        assert!(r.stdout.contains(line), "{line:?} missing:\n{}", r.stdout);
    }
    let r = ok(&["identify", "--addr", &addr, "--json", "--nsid", "1"]);
    for field in [
        "\"size_bytes\": 268435456",
        "\"nsze\": 524288",
        "\"block_size\": 512",
    ] {
        assert!(r.stdout.contains(field), "{field} missing:\n{}", r.stdout);
    }
    // Discovery over the NVMe/TCP port itself, as Linux hosts do.
    let r = ok(&["discover", "--addr", &addr, "--nqn", DISCOVERY_NQN]);
    assert!(r.stdout.contains("subnqn:  nqn.2026-11.dev.keel:default"));
}

/// write then read: 4 KiB, 1 MiB (split at MDTS = 128 KiB), the last block; verify; a
/// verify against the wrong seed fails with the mismatching offsets.
fn round_trips(addr: &str, digests: &str) {
    let d = ["--digests", digests];
    for (name, lba, len, seed) in [
        ("small", 0u64, 4096usize, 1u64),
        ("1mib", 1000, 1 << 20, 2),
        ("last", NSZE - 1, 512, 3),
    ] {
        let data = noise(len, seed ^ digests.len() as u64);
        let input = ScratchFile::new(&format!("nvme-{digests}-{name}.in"), 0);
        let output = ScratchFile::new(&format!("nvme-{digests}-{name}.out"), 0);
        std::fs::write(input.path(), &data).expect("writing the input");
        let lba_s = lba.to_string();
        let count = (len / 512).to_string();
        let inp = input.path().to_str().expect("utf-8 path");
        let outp = output.path().to_str().expect("utf-8 path");
        let w = ok(&[
            &["write", "--addr", addr, "--lba", &lba_s, "-i", inp][..],
            &d,
        ]
        .concat());
        assert!(
            w.stderr.contains(&format!("wrote {count} block(s)")),
            "{}",
            w.stderr
        );
        ok(&[
            &[
                "read", "--addr", addr, "--lba", &lba_s, "--count", &count, "-o", outp,
            ][..],
            &d,
        ]
        .concat());
        let back = std::fs::read(output.path()).expect("reading the output");
        assert!(
            back == data,
            "{name}: read back differs from what was written"
        );
    }
    let v = ok(&[
        &[
            "verify",
            "--addr",
            addr,
            "--lba",
            "4096",
            "--count",
            "8192",
            "--pattern",
            "7",
        ][..],
        &d,
    ]
    .concat());
    assert!(v.stdout.contains(": OK in"), "{}", v.stdout);
    let bad = nvme(
        &[
            &[
                "verify",
                "--addr",
                addr,
                "--lba",
                "4096",
                "--count",
                "16",
                "--pattern",
                "8",
                "--read-only",
            ][..],
            &d,
        ]
        .concat(),
    );
    assert_eq!(bad.code, 1, "a mismatch must fail");
    assert!(bad.stdout.contains("MISMATCH"), "{}", bad.stdout);
    assert!(
        bad.stdout
            .contains("byte 0 (LBA 4096, byte 0 of the block)"),
        "{}",
        bad.stdout
    );
}

#[test]
fn nvme_write_read_verify_round_trip() {
    let (_q, addr) = boot_nvmf();
    round_trips(&addr, "none");
}

#[test]
fn nvme_digests_header_and_data() {
    let (_q, addr) = boot_nvmf();
    round_trips(&addr, "both");
    // Each digest alone, briefly.
    for d in ["header", "data"] {
        let v = ok(&[
            "verify",
            "--addr",
            &addr,
            "--lba",
            "0",
            "--count",
            "512",
            "--digests",
            d,
        ]);
        assert!(v.stdout.contains(": OK in"), "{}", v.stdout);
    }
}

#[test]
fn nvme_error_statuses() {
    let (_q, addr) = boot_nvmf();
    // The CLI reports the status by name and exits non-zero.
    let r = nvme(&[
        "read",
        "--addr",
        &addr,
        "--lba",
        &(NSZE - 1).to_string(),
        "--count",
        "2",
        "-o",
        "/dev/null",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("LBA Out of Range (SCT 0h, SC 80h"),
        "{}",
        r.stderr
    );
    let r = nvme(&[
        "identify",
        "--addr",
        &addr,
        "--nqn",
        "nqn.2026-11.dev.keel:nope",
    ]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("Connect Invalid Parameters"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("(SUBNQN)"), "{}", r.stderr);

    // The exact statuses, through the library.
    let c = Controller::connect(params(&addr)).expect("connect");
    assert_eq!(c.set_io_queues(1).expect("number of queues"), 1);
    let mut q = c.io_queue(1, 4).expect("I/O queue");
    let mut status = |kind: IoKind, nsid: u32, lba: u64, blocks: u32| {
        let len = blocks * 512;
        let cid = q
            .submit(kind, nsid, lba, blocks, vec![0; len as usize], len)
            .expect("submit");
        let (got, done) = q.next_completion().expect("completion");
        assert_eq!(got, cid);
        done.cqe.status
    };
    for (kind, nsid, lba, blocks) in [
        (IoKind::Read, 1, NSZE, 1),
        (IoKind::Read, 1, NSZE - 1, 2),
        (IoKind::Write, 1, NSZE - 3, 8),
    ] {
        let s = status(kind, nsid, lba, blocks);
        assert_eq!(
            (s.sct, s.sc),
            (0, 0x80),
            "{kind:?} LBA {lba} +{blocks}: {s}"
        );
    }
    for (kind, nsid) in [(IoKind::Read, 2), (IoKind::Write, 2), (IoKind::Read, 0)] {
        let s = status(kind, nsid, 0, 1);
        assert_eq!((s.sct, s.sc), (0, 0x0B), "{kind:?} NSID {nsid}: {s}");
    }
    // The queue is still good.
    let s = status(IoKind::Read, 1, NSZE - 1, 1);
    assert!(s.is_success(), "{s}");
    q.close().expect("disconnect the I/O queue");
    c.close().expect("shut the controller down");

    // A wrong subsystem NQN is refused at Connect.
    let mut p = params(&addr);
    p.subnqn = "nqn.2026-11.dev.keel:nope".into();
    match Controller::connect(p) {
        Err(NvmeError::Status { status, dw0, .. }) => {
            assert_eq!((status.sct, status.sc), (1, 0x82), "{status}");
            assert_eq!(dw0, (1 << 16) | 256, "IATTR data, IPO SUBNQN");
        }
        other => panic!("connect with a wrong NQN: {other:?}"),
    }
}

#[test]
fn nvme_keep_alive_holds_an_idle_association() {
    let (_q, addr) = boot_nvmf();
    let mut p = params(&addr);
    // KATO 2 s; the target ends the association 1 s after that without keep alive.
    p.kato = Duration::from_secs(2);
    let c = Controller::connect(p).expect("connect");
    c.set_io_queues(1).expect("number of queues");
    let mut q = c.io_queue(1, 1).expect("I/O queue");
    std::thread::sleep(Duration::from_secs(7));
    let data = q.read(1, 0, 8, 512).expect("read after 7 s idle");
    assert_eq!(data.len(), 4096);
    c.identify(1, 0).expect("Identify after 7 s idle");
    q.close().expect("disconnect");
    c.close().expect("shutdown");
}

#[test]
fn nvme_bench_completes() {
    let (_q, addr) = boot_nvmf();
    let r = ok(&[
        "bench", "--addr", &addr, "--ios", "2000", "--qd", "8", "--json",
    ]);
    assert!(r.stdout.contains("\"ios\": 2000,"), "{}", r.stdout);
    let iops: f64 = r
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"iops\": "))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .expect("iops in the JSON");
    assert!(iops > 0.0);
    let r = ok(&[
        "bench",
        "--addr",
        &addr,
        "--ios",
        "2000",
        "--qd",
        "8",
        "--rw",
        "mix",
        "--mix-read",
        "50",
        "--connections",
        "2",
        "--pattern",
        "seq",
        "--digests",
        "both",
    ]);
    assert!(r.stdout.contains(": 2000 ios in"), "{}", r.stdout);
    assert!(r.stdout.contains("read   lat (us)"), "{}", r.stdout);
    assert!(r.stdout.contains("write  lat (us)"), "{}", r.stdout);
}

/// Two hosts at once, each with eight I/O queues of depth 128 full of commands: every I/O
/// completes on both (the target's concurrency limits, not a speed figure).
#[test]
fn nvme_two_hosts_with_eight_queues_of_depth_128() {
    let (_q, addr) = boot_nvmf();
    let run = |host: &'static str, addr: String| {
        std::thread::spawn(move || {
            nvme(&[
                "bench",
                "--addr",
                &addr,
                "--hostnqn",
                host,
                "--connections",
                "8",
                "--qd",
                "128",
                "--ios",
                "16384",
                "--rw",
                "mix",
                "--mix-read",
                "50",
                "--json",
            ])
        })
    };
    let a = run(
        "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001",
        addr.clone(),
    );
    let b = run(
        "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002",
        addr,
    );
    for r in [a.join().unwrap(), b.join().unwrap()] {
        assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains("\"ios\": 16384,"), "{}", r.stdout);
    }
}
