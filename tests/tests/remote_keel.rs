//! Remote volumes between two Keels (issue 15), in QEMU: a Keel *initiator* whose namespaces
//! live on a second Keel, the *remote*, reached over NVMe/TCP through QEMU's user networking
//! (the initiator reaches the host, and the remote's forwarded port, at 10.0.2.2).
//!
//! The remote serves NSID 1 = an NVMe drive (a scratch file, so that its data outlives a
//! restart of its QEMU), NSID 2 and 3 = RAM. The initiator serves:
//! - emulated function 0's namespace = remote NSID 1 (the SNAP pattern);
//! - emulated function 1's namespace = remote NSID 2, encrypted with AES-256-XTS on the
//!   initiator (the remote stores ciphertext only);
//! - its own NVMe/TCP namespace 1 = remote NSID 3 (a gateway).
//!
//! One boot of each is used for every check: data written through each export is read back
//! from the remote's side; the encrypted export leaves no plaintext on the remote nor on the
//! wire between the two (QEMU `filter-dump` of the initiator's traffic, decoded by tshark as
//! NVMe/TCP); `keelctl status` and `/metrics` show the associations and their paths; then the
//! remote is killed in the middle of a verifying workload through function 0 and booted again
//! within `ctrl_loss_tmo`: the workload completes and verifies, and the remote's drive holds
//! every block the workload wrote.

use keel_host_tools::mgmt::keel_mgmt;
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, free_port, keelctl, keelctl_in_background, keelctl_ok,
    root, run_bounded,
};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.dev.keel:default";
/// A development AES-256-XTS key (two different halves).
const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
                   f0e1d2c3b4a5968778695a4b3c2d1e0f0123456789abcdeffedcba9876543210";
/// Bound on one keelctl run against the remote through the initiator (TCG on a loaded
/// machine; the reconnecting workload included).
const RUN: Duration = Duration::from_secs(300);

fn say(msg: impl AsRef<str>) {
    eprintln!("remote_keel: {}", msg.as_ref());
}

fn keelctl_run(args: &[&str]) -> keel_tests::Run {
    run_bounded(Command::new(keelctl()).args(args), RUN)
}

fn boot_remote(port: u16, disk: &Path) -> Qemu {
    let mut q = Qemu::boot(
        Build::Release,
        &[
            "--nvmf-port",
            &port.to_string(),
            "--disk",
            &disk.display().to_string(),
            "--append",
            "keel.ns=drive:0,ram:64,ram:64",
        ],
    );
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("remote: {e}"));
    q
}

/// Waits until the console shows every one of `lines` (in any order).
fn wait_console(q: &Qemu, lines: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = q.console();
        if lines.iter().all(|l| c.contains(l)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all of {lines:?} within 120 s; console:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Deterministic bytes that look like nothing (xorshift).
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Whether `hay` contains `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn read_remote(port: u16, nsid: u32, blocks: u64, out: &Path) -> Vec<u8> {
    keelctl_ok(&[
        "nvme",
        "read",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--nsid",
        &nsid.to_string(),
        "--lba",
        "0",
        "--count",
        &blocks.to_string(),
        "-o",
        &out.display().to_string(),
    ]);
    std::fs::read(out).expect("reading what keelctl read")
}

#[test]
fn remote_volumes_between_two_keels() {
    let t0 = Instant::now();
    let disk = ScratchFile::new("remote-drive.img", 256 << 20);
    let win0 = ScratchFile::new("remote-win0.img", 64 << 20);
    let win1 = ScratchFile::new("remote-win1.img", 64 << 20);
    let pcap = ScratchFile::new("remote-initiator.pcap", 0);
    let scratch = ScratchFile::new("remote-io.bin", 0);
    let (rport, iport, mport) = (free_port(), free_port(), free_port());
    let mut remote = boot_remote(rport, disk.path());
    say(format!(
        "remote ready ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));

    let append = format!(
        "keel.fn.ns=remote:10.0.2.2:{rport}:{NQN}:1,remote:10.0.2.2:{rport}:{NQN}:2 \
         keel.fn.xts=1:{KEY} keel.ns=remote:10.0.2.2:{rport}:{NQN}:3 \
         keel.remote.queues=2 keel.remote.reconnect_delay=1 keel.remote.ctrl_loss_tmo=120"
    );
    let dump = format!(
        "filter-dump,id=f0,netdev=net0,file={}",
        pcap.path().display()
    );
    let (w0, w1) = (
        win0.path().display().to_string(),
        win1.path().display().to_string(),
    );
    let mut init = Qemu::boot(
        Build::Release,
        &[
            "--nvmf-port",
            &iport.to_string(),
            "--mgmt-port",
            &mport.to_string(),
            "--window",
            &w0,
            "--window",
            &w1,
            "--append",
            &append,
            "--",
            "-object",
            &dump,
        ],
    );
    init.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("initiator: {e}"));
    wait_console(
        &init,
        &[
            "remote: function 0 namespace 1 served",
            "remote: function 1 namespace 1 served",
            "remote: namespace 1 served",
        ],
    );
    say(format!(
        "initiator serves its three remote namespaces ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));
    let io = scratch.path();
    let file = |data: &[u8]| {
        std::fs::write(io, data).expect("writing the data file");
        io.display().to_string()
    };
    let back = ScratchFile::new("remote-back.bin", 0);

    // 1. Through the emulated function (SNAP): the blocks land on the remote's drive.
    let data = noise(1 << 20, 0x5eed);
    keelctl_ok(&[
        "host",
        "--window",
        &w0,
        "write",
        "--nsid",
        "1",
        "--lba",
        "0",
        "-i",
        &file(&data),
    ]);
    assert!(
        read_remote(rport, 1, 2048, back.path()) == data,
        "the remote's namespace 1 does not hold what was written through function 0"
    );

    // 2. Through the initiator's own NVMe/TCP target (a gateway).
    let data = noise(256 << 10, 0x9a7e);
    keelctl_ok(&[
        "nvme",
        "write",
        "--addr",
        &format!("127.0.0.1:{iport}"),
        "--nsid",
        "1",
        "--lba",
        "0",
        "-i",
        &file(&data),
    ]);
    assert!(
        read_remote(rport, 3, 512, back.path()) == data,
        "the remote's namespace 3 does not hold what was written through the gateway"
    );

    // 3. Encrypted on the way: text a capture would show, ciphertext only on the remote.
    let plain: Vec<u8> = (0..)
        .flat_map(|i: u32| {
            format!("KEEL-PLAINTEXT line {i:08} of a remote volume test\n").into_bytes()
        })
        .take(256 << 10)
        .collect();
    keelctl_ok(&[
        "host",
        "--window",
        &w1,
        "write",
        "--nsid",
        "1",
        "--lba",
        "0",
        "-i",
        &file(&plain),
    ]);
    let stored = read_remote(rport, 2, 512, back.path());
    assert_ne!(stored, plain);
    assert!(
        !contains(&stored, b"KEEL-PLAINTEXT"),
        "plaintext on the remote"
    );
    keelctl_ok(&[
        "host",
        "--window",
        &w1,
        "read",
        "--nsid",
        "1",
        "--lba",
        "0",
        "--count",
        "512",
        "-o",
        &back.path().display().to_string(),
    ]);
    assert!(
        std::fs::read(back.path()).unwrap() == plain,
        "function 1 does not read back its plaintext"
    );
    check_capture(pcap.path(), rport, &stored);

    // 4. Status and metrics: three remote volumes, each online over its one path.
    let key = root().join("qemu/dev-keys/provision.key");
    let json = keelctl_ok(&[
        "status",
        "--device",
        &format!("127.0.0.1:{mport}"),
        "--key",
        &key.display().to_string(),
        "--json",
    ]);
    let mut s: keel_mgmt::Snapshot = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(s.remotes.len(), 3, "{json}");
    s.remotes.sort_by_key(|r| r.nsid);
    for (r, nsid) in s.remotes.iter().zip([1, 2, 3]) {
        assert_eq!((r.subnqn.as_str(), r.nsid), (NQN, nsid), "{json}");
        assert_eq!(r.state, "online", "{json}");
        assert_eq!(r.paths.len(), 1);
        let p = &r.paths[0];
        assert_eq!(p.addr, format!("10.0.2.2:{rport}"));
        assert_eq!((p.state.as_str(), p.io_queues), ("live", 2), "{json}");
        assert!(p.commands > 0 && r.failed == 0, "{json}");
    }
    assert_eq!(
        s.remotes[1].exports,
        [("nqn.2026-11.dev.keel:fn1".to_string(), 1)]
    );
    let table = keelctl_ok(&[
        "status",
        "--device",
        &format!("127.0.0.1:{mport}"),
        "--key",
        &key.display().to_string(),
    ]);
    assert!(table.contains("remote volumes (3):"), "{table}");
    let metrics = keelctl_ok(&["metrics", "--device", &format!("127.0.0.1:{mport}")]);
    let live = format!(
        "keel_remote_path_state{{remote=\"{NQN}\",remote_namespace=\"2\",path=\"10.0.2.2:{rport}\",state=\"live\"}} 1"
    );
    assert!(metrics.contains(&live), "{live} missing:\n{metrics}");
    promtool(&metrics);

    // 5. The remote dies in the middle of a verifying workload and comes back.
    let workload = keelctl_in_background(
        &[
            "host",
            "--window",
            &w0,
            "--timeout",
            "200",
            "verify",
            "--nsid",
            "1",
            "--lba",
            "0",
            "--count",
            "200000",
            "--qd",
            "16",
            "--pattern",
            "0x7e57",
        ],
        RUN,
    );
    // Killed early: 100 MiB through one remote takes several seconds even on a quiet machine.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !workload.is_finished(),
        "the workload ended before the remote was killed"
    );
    say("killing the remote");
    remote.kill();
    std::thread::sleep(Duration::from_secs(3));
    let mut remote = boot_remote(rport, disk.path());
    say("remote booted again");
    let r = workload.join().expect("workload thread");
    assert_eq!(
        r.code, 0,
        "the workload failed across the remote's restart: {r:?}"
    );
    assert!(r.stdout.contains("OK"), "{r:?}");
    wait_console(&init, &["association attempt failed"]);
    // Everything the workload wrote (and the initiator acknowledged) is on the remote's drive.
    let r = keelctl_run(&[
        "nvme",
        "verify",
        "--addr",
        &format!("127.0.0.1:{rport}"),
        "--nsid",
        "1",
        "--lba",
        "0",
        "--count",
        "200000",
        "--pattern",
        "0x7e57",
        "--read-only",
    ]);
    assert_eq!(
        r.code, 0,
        "the remote's drive lacks acknowledged writes: {r:?}"
    );
    let json = keelctl_ok(&[
        "status",
        "--device",
        &format!("127.0.0.1:{mport}"),
        "--key",
        &key.display().to_string(),
        "--json",
    ]);
    let mut s: keel_mgmt::Snapshot = serde_json::from_str(&json).expect("status JSON");
    s.remotes.sort_by_key(|r| r.nsid);
    let p = &s.remotes[0].paths[0];
    assert!(p.losses >= 1 && p.connects >= 2, "{json}");
    assert_eq!(s.remotes[0].failed, 0, "{json}");
    say(format!(
        "done in {:.1} s: {} requests through function 0, {} commands re-sent after the loss",
        t0.elapsed().as_secs_f64(),
        s.remotes[0].submitted,
        s.remotes[0].failovers
    ));
    init.kill();
    remote.kill();
}

/// The initiator's capture: its traffic with the remote decodes as NVMe/TCP without malformed
/// PDUs and carries the encrypted namespace's data (its ciphertext, as stored on the remote),
/// never its plaintext.
fn check_capture(pcap: &Path, rport: u16, ciphertext: &[u8]) {
    let bytes = std::fs::read(pcap).expect("reading the capture");
    assert!(
        !contains(&bytes, b"KEEL-PLAINTEXT"),
        "plaintext of the encrypted namespace in the capture"
    );
    // 32-byte pieces of the ciphertext, one per 512-byte block: on the wire unless a TCP
    // segment boundary splits one.
    let samples: Vec<&[u8]> = ciphertext.chunks(512).map(|c| &c[100..132]).collect();
    let found = samples.iter().filter(|s| contains(&bytes, s)).count();
    assert!(
        found * 10 >= samples.len() * 9,
        "only {found} of {} ciphertext pieces in the capture",
        samples.len()
    );
    let tshark = |filter: &str, field: &str| {
        let out = Command::new("tshark")
            .arg("-r")
            .arg(pcap)
            .args(["-d", &format!("tcp.port=={rport},nvme-tcp"), "-Y", filter])
            .args(["-T", "fields", "-e", field])
            .output()
            .expect("running tshark (apt-get install tshark)");
        assert!(
            out.status.success(),
            "tshark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let malformed = tshark("_ws.malformed", "_ws.col.Info");
    if !malformed.trim().is_empty() {
        let keep = root().join("target/qemu-tests/remote_keel-failed.pcap");
        let _ = std::fs::copy(pcap, &keep);
        panic!(
            "malformed frames (capture kept in {}):\n{malformed}",
            keep.display()
        );
    }
    let types = tshark("nvme-tcp", "nvme-tcp.type");
    // CapsuleCmd (04h) with the writes' data in capsule, CapsuleResp (05h), R2T (09h) and
    // H2CData (06h) for writes above the remote's in-capsule size, C2HData (07h) for reads.
    for (t, what) in [
        ("4", "CapsuleCmd"),
        ("5", "CapsuleResp"),
        ("6", "H2CData"),
        ("7", "C2HData"),
    ] {
        assert!(
            types.lines().any(|l| l.split(',').any(|x| x == t)),
            "no {what} PDU in the capture"
        );
    }
}

/// `promtool check metrics` when promtool is installed.
fn promtool(text: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        say("promtool not installed: metrics not checked by it");
        return;
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
