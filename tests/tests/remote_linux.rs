//! Remote volumes against a foreign target (issue 15): Linux's nvmet-tcp (Debian's arm64
//! kernel, `qemu/linux-target`) serving one RAM namespace on two ports, the namespace's ANA
//! group optimized on the first and non-optimized on the second; a Keel initiator exports it
//! through its emulated function over both paths (multipath, round-robin among the paths of
//! the best ANA state).
//!
//! One boot of each: data written through the function is read back from Linux's side; I/O
//! goes to the optimized path only; the optimized path dies (its port unlinked in configfs:
//! Linux deletes its controllers and closes the listener) in the middle of a verifying
//! workload, which completes without an error on the non-optimized path; the port comes back
//! and I/O returns to it (failback); then its ANA state turns inaccessible (an ANA change
//! event) and I/O moves to the other path again.
//!
//! Needs, on first run, the Debian mirror (qemu/linux-target/prepare downloads the arm64
//! kernel and busybox packages once into `target/linux-cache`, or `$KEEL_LINUX_CACHE`). When
//! that is impossible the test fails and says why.

use keel_host_tools::mgmt::keel_mgmt::{RemoteInfo, Snapshot};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, free_port, keelctl, keelctl_in_background, keelctl_ok,
    root, run_bounded,
};
use std::process::Command;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.dev.keel:default";
/// Linux under TCG on a loaded 2-core machine: boot, and each keelctl run through it.
const LINUX_BOOT: Duration = Duration::from_secs(300);
const RUN: Duration = Duration::from_secs(300);
/// Blocks (512 bytes) of the verifying workload the optimized path dies in, from LBA 4096: the
/// rest of the 64 MiB namespace.
const WORKLOAD_BLOCKS: u64 = (64 << 11) - 4096;

fn say(msg: impl AsRef<str>) {
    eprintln!("remote_linux: {}", msg.as_ref());
}

fn keelctl_run(args: &[&str]) -> keel_tests::Run {
    run_bounded(Command::new(keelctl()).args(args), RUN)
}

/// The initiator's one remote volume, from `keelctl status --json`.
fn volume(mport: u16) -> RemoteInfo {
    let key = root().join("qemu/dev-keys/provision.key");
    let json = keelctl_ok(&[
        "status",
        "--device",
        &format!("127.0.0.1:{mport}"),
        "--key",
        &key.display().to_string(),
        "--json",
    ]);
    let mut s: Snapshot = serde_json::from_str(&json).expect("status JSON");
    assert_eq!(s.remotes.len(), 1, "{json}");
    s.remotes.remove(0)
}

/// Waits (up to 120 s) until `ok` holds for the volume; returns it.
fn wait_volume(mport: u16, what: &str, ok: impl Fn(&RemoteInfo) -> bool) -> RemoteInfo {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = volume(mport);
        if ok(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never {what}: {v:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// (state, ANA state, commands sent) of path `i`.
fn path(v: &RemoteInfo, i: usize) -> (&str, &str, u64) {
    let p = &v.paths[i];
    (p.state.as_str(), p.ana.as_str(), p.commands)
}

/// In `tests/run` (about 45 s on a quiet machine: Linux boots in ~15 s under TCG; the
/// arm64 kernel cache is the one `compare_short.rs` prepares).
#[test]
fn remote_volume_on_linux_nvmet_over_two_paths() {
    let t0 = Instant::now();
    let (pa, pb, mport) = (free_port(), free_port(), free_port());
    let mut linux = Qemu::linux_target(
        "keel.ram_mib=64 keel.port2=4421 keel.ana2=non-optimized",
        &[(pa, 4420), (pb, 4421)],
    );
    linux
        .wait_for("LINUX-NVMET: ready", LINUX_BOOT)
        .unwrap_or_else(|e| panic!("Linux target: {e}"));
    say(format!(
        "Linux nvmet ready ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));

    let win = ScratchFile::new("remote-linux-win.img", 64 << 20);
    let w = win.path().display().to_string();
    let mut init = Qemu::boot(
        Build::Release,
        &[
            "--mgmt-port",
            &mport.to_string(),
            "--window",
            &w,
            "--append",
            &format!(
                "keel.fn.ns=remote:10.0.2.2:{pa}+10.0.2.2:{pb}:{NQN}:1 keel.remote.queues=2 \
                 keel.remote.reconnect_delay=1 keel.remote.ctrl_loss_tmo=600"
            ),
        ],
    );
    init.wait_for(
        "remote: function 0 namespace 1 served",
        BOOT_TIMEOUT + Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("initiator: {e}"));
    let v = wait_volume(mport, "both paths live", |v| {
        v.paths.iter().all(|p| p.state == "live")
    });
    assert_eq!(v.size_bytes, 64 << 20);
    assert_eq!(path(&v, 0).1, "optimized", "{v:#?}");
    assert_eq!(path(&v, 1).1, "non-optimized", "{v:#?}");
    say(format!(
        "initiator: both paths live ({:.1} s)",
        t0.elapsed().as_secs_f64()
    ));

    // 1. Written through the emulated function, read from Linux's side; only the optimized
    //    path carried it.
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let io = ScratchFile::new("remote-linux-io.bin", 0);
    std::fs::write(io.path(), &data).expect("data file");
    let io_path = io.path().display().to_string();
    keelctl_ok(&[
        "host", "--window", &w, "write", "--nsid", "1", "--lba", "0", "-i", &io_path,
    ]);
    let back = ScratchFile::new("remote-linux-back.bin", 0);
    keelctl_ok(&[
        "nvme",
        "read",
        "--addr",
        &format!("127.0.0.1:{pa}"),
        "--lba",
        "0",
        "--count",
        "2048",
        "-o",
        &back.path().display().to_string(),
    ]);
    assert!(
        std::fs::read(back.path()).expect("read back") == data,
        "Linux's namespace does not hold what was written through the function"
    );
    let v = volume(mport);
    assert!(path(&v, 0).2 > 0, "{v:#?}");
    assert_eq!(
        path(&v, 1).2,
        0,
        "the non-optimized path carried I/O: {v:#?}"
    );

    // 2. Failover: the optimized path dies during a verifying workload. The workload covers
    //    most of the namespace (60 MiB written and read back) so that it is still running
    //    when the path dies on a quiet machine too (10 MiB once finished within 3 s).
    let before = path(&volume(mport), 0).2;
    let workload = keelctl_in_background(
        &[
            "host",
            "--window",
            &w,
            "--timeout",
            "250",
            "verify",
            "--nsid",
            "1",
            "--lba",
            "4096",
            "--count",
            &WORKLOAD_BLOCKS.to_string(),
            "--qd",
            "16",
            "--pattern",
            "0x11a5",
        ],
        RUN,
    );
    // Running: the optimized path has carried some of its commands.
    wait_volume(mport, "the workload on path 1", |v| {
        v.paths[0].commands > before + 64
    });
    assert!(
        !workload.is_finished(),
        "the workload ended before the path died"
    );
    linux.send("port 1 down");
    linux
        .wait_for("LINUX-NVMET: ok port 1 down", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("Linux target: {e}"));
    say("port 1 (the optimized path) down");
    let r = workload.join().expect("workload thread");
    assert_eq!(r.code, 0, "I/O failed when one of two paths died: {r:?}");
    assert!(r.stdout.contains("OK"), "{r:?}");
    let v = volume(mport);
    assert_ne!(path(&v, 0).0, "live", "{v:#?}");
    assert!(path(&v, 1).2 > 0, "the other path carried nothing: {v:#?}");
    assert_eq!((v.failed, v.path_errors), (0, 0), "{v:#?}");
    assert_eq!(v.state, "degraded", "{v:#?}");

    // 3. Failback: the port comes back, I/O returns to the optimized path.
    linux.send("port 1 up");
    linux
        .wait_for("LINUX-NVMET: ok port 1 up", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("Linux target: {e}"));
    let v = wait_volume(mport, "path 1 live again", |v| v.paths[0].state == "live");
    let (a0, b0) = (path(&v, 0).2, path(&v, 1).2);
    keelctl_ok(&[
        "host", "--window", &w, "write", "--nsid", "1", "--lba", "0", "-i", &io_path,
    ]);
    let v = volume(mport);
    assert!(path(&v, 0).2 > a0, "no failback: {v:#?}");
    assert_eq!(path(&v, 1).2, b0, "{v:#?}");
    say("failback to port 1");

    // 4. ANA: the optimized path turns inaccessible; I/O moves to the other one.
    linux.send("ana 1 inaccessible");
    let v = wait_volume(mport, "path 1 inaccessible", |v| {
        v.paths[0].ana == "inaccessible"
    });
    let (a0, b0) = (path(&v, 0).2, path(&v, 1).2);
    keelctl_ok(&[
        "host", "--window", &w, "write", "--nsid", "1", "--lba", "0", "-i", &io_path,
    ]);
    let v = volume(mport);
    assert_eq!(path(&v, 0).2, a0, "I/O on an inaccessible path: {v:#?}");
    assert!(path(&v, 1).2 > b0, "{v:#?}");
    assert_eq!(v.failed, 0, "{v:#?}");
    let r = keelctl_run(&[
        "nvme",
        "verify",
        "--addr",
        &format!("127.0.0.1:{pb}"),
        "--lba",
        "4096",
        "--count",
        &WORKLOAD_BLOCKS.to_string(),
        "--pattern",
        "0x11a5",
        "--read-only",
    ]);
    assert_eq!(
        r.code, 0,
        "Linux's namespace lacks the workload's writes: {r:?}"
    );
    say(format!("done in {:.1} s", t0.elapsed().as_secs_f64()));
    init.kill();
    linux.kill();
}
