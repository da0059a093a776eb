//! Emulated functions created and removed live through the management port (issue 18), the
//! short form CI runs: the release firmware boots with three function slots (three windows,
//! `keel.fn.boot=0`: none has a function), and `keelctl function create` makes a physical
//! function and two virtual functions, each its own subsystem, namespaces and controller
//! limits. The host side is `keelctl host --window` on this machine (the host VM's form, with
//! QEMU hot-plugging the windows into the VM, is `qemu/hostvm/hotplug`, the long form):
//!
//! - before: every slot free, a host finds no function on a window (no header);
//! - each function identified with its own subsystem; a pattern written through each; each
//!   reads back its own pattern and not another's (isolation);
//! - bad requests: creating on a busy slot, on a slot the device does not have, with an NQN in
//!   use, with a bad namespace; removing a free slot; a malformed signed frame. Each gets a
//!   clear refusal and the slots stay as they were;
//! - a VF removed while a host runs I/O on it: the host's driver stops with an error (CSTS.CFS,
//!   then no function), never hangs; the slot is free, removing it again is refused; the other
//!   two functions keep their data and keep working; a new function on the freed slot starts
//!   with zeroed storage;
//! - the firmware console shows no panic or exception.
//!
//! And with functions in the device description (a second test, booted from flash): a
//! `keelctl provision push` adds a PF (a plain and an encrypted namespace, a limit) and then a
//! VF live, and removes the VF again, while a host runs I/O on the PF without an error; a push
//! naming a slot the device does not have is refused and changes nothing; after a reboot the
//! PF is back with the same NGUIDs; a VF created again on the slot gets new ones.

use keel_mgmt::{FunctionSlotInfo, QosLimit, SlotState};
use keel_tests::provision::{Dir, boot_flash, build_from, description, flash_with};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, Run, ScratchFile, free_port, keelctl, keelctl_host, mgmt_status,
    root, run_bounded, run_keelctl,
};
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn dev_key() -> String {
    root()
        .join("qemu/dev-keys/provision.key")
        .display()
        .to_string()
}

/// `keelctl function ARGS --device ADDR --key DEV_KEY`.
fn function(addr: &str, args: &[&str]) -> Run {
    let key = dev_key();
    let mut all = vec!["function"];
    all.extend_from_slice(&args[..1]);
    all.extend_from_slice(&["--device", addr, "--key", &key]);
    all.extend_from_slice(&args[1..]);
    run_keelctl(None, &all)
}

/// `keelctl host --window W --timeout 5 ARGS`.
fn host(window: &Path, args: &[&str]) -> Run {
    let mut all = vec!["--timeout", "5"];
    all.extend_from_slice(args);
    keelctl_host(window, &all)
}

fn host_ok(window: &Path, args: &[&str]) -> String {
    let r = host(window, args);
    assert_eq!(r.code, 0, "keelctl host {args:?}: {r:?}");
    r.stdout
}

/// `keelctl host --window W --timeout T bench --rw write --qd 8 --duration SECS ARGS` in a
/// thread, bounded at SECS + 40 s.
fn host_in_background(
    window: &Path,
    timeout: &str,
    args: &[&str],
    secs: u64,
) -> std::thread::JoinHandle<Run> {
    let mut cmd = Command::new(keelctl());
    cmd.arg("host")
        .arg("--window")
        .arg(window)
        .args(["--timeout", timeout]);
    cmd.args(["bench", "--rw", "write", "--qd", "8", "--duration"])
        .arg(secs.to_string())
        .args(args);
    std::thread::spawn(move || run_bounded(&mut cmd, Duration::from_secs(secs + 40)))
}

fn slots(addr: &str) -> Vec<FunctionSlotInfo> {
    mgmt_status(addr).function_slots
}

#[test]
fn functions_created_and_removed_live_through_the_management_port() {
    let wins: Vec<ScratchFile> = (0..3)
        .map(|i| ScratchFile::new(&format!("hotplug-win{i}"), 16 << 20))
        .collect();
    let mport = free_port();
    let addr = format!("127.0.0.1:{mport}");
    let mut args: Vec<String> = vec!["--mgmt-port".into(), mport.to_string()];
    for w in &wins {
        args.push("--window".into());
        args.push(w.path().display().to_string());
    }
    args.extend(["--append".into(), "keel.fn.boot=0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut fw = Qemu::boot(Build::Release, &args);
    fw.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    // Three free slots; a host finds no function on a window.
    let s = slots(&addr);
    assert_eq!(s.len(), 3, "{s:?}");
    assert!(s.iter().all(|x| x.state == SlotState::Free), "{s:?}");
    let r = host(wins[0].path(), &["identify"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("window header"), "{r:?}");

    // PF with two namespaces and a write limit, two VFs with one each.
    let nqn = |i: usize| format!("nqn.2026-12.test.hotplug:{}", ["pf", "vf1", "vf2"][i]);
    let t0 = Instant::now();
    let out = function(
        &addr,
        &[
            "create",
            "--slot",
            "0",
            "--nqn",
            &nqn(0),
            "--ns",
            "ram:8MiB",
            "--ns",
            "ram:4MiB:4096",
            "--limit",
            "write_iops=20000/200",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("slot 0 (pf): created"), "{out:?}");
    for i in 1..3 {
        let slot = i.to_string();
        // VF 2's namespace is encrypted (a key the device draws): the host sees plain data.
        let ns = ["", "ram:8MiB", "ram:8MiB,aes-256-xts"][i];
        let r = function(
            &addr,
            &["create", "--slot", &slot, "--nqn", &nqn(i), "--ns", ns],
        );
        assert_eq!(r.code, 0, "{r:?}");
        assert!(
            r.stdout.contains(&format!("slot {i} (vf{i}): created")),
            "{r:?}"
        );
    }
    eprintln!("three functions created in {:?}", t0.elapsed());
    let s = slots(&addr);
    for (i, x) in s.iter().enumerate() {
        assert_eq!(
            (x.state, x.subsystem.clone()),
            (SlotState::Live, nqn(i)),
            "{s:?}"
        );
    }
    assert_eq!(s[0].nsids, [1, 2]);
    assert_eq!(
        s[0].limits,
        [QosLimit {
            name: "write_iops".into(),
            per_sec: 20000,
            burst: 200
        }]
    );
    let text = function(&addr, &["list"]);
    assert!(
        text.stdout.contains("vf2") && text.stdout.contains("created"),
        "{text:?}"
    );

    // Each function: its own subsystem; a pattern of its own written, read back; another
    // function's pattern is not there.
    for (i, w) in wins.iter().enumerate() {
        let id = host_ok(w.path(), &["identify"]);
        assert!(id.contains(&nqn(i)), "{id}");
        let p = format!("{:#x}", 0x1000 + i);
        host_ok(
            w.path(),
            &["verify", "--lba", "0", "--count", "256", "--pattern", &p],
        );
    }
    let check = |w: &ScratchFile, i: usize| {
        host(
            w.path(),
            &[
                "verify",
                "--read-only",
                "--lba",
                "0",
                "--count",
                "256",
                "--pattern",
                &format!("{:#x}", 0x1000 + i),
            ],
        )
    };
    for (i, w) in wins.iter().enumerate() {
        assert_eq!(check(w, i).code, 0, "function {i} lost its data");
        let other = (i + 1) % 3;
        assert_ne!(
            check(w, other).code,
            0,
            "function {i} reads function {other}'s data"
        );
    }

    // Bad requests: refused with a reason; nothing changes.
    let before = slots(&addr);
    for (args, why) in [
        (
            vec![
                "create",
                "--slot",
                "1",
                "--nqn",
                "nqn.2026-12.test:x",
                "--ns",
                "ram:4MiB",
            ],
            "busy",
        ),
        (
            vec![
                "create",
                "--slot",
                "7",
                "--nqn",
                "nqn.2026-12.test:x",
                "--ns",
                "ram:4MiB",
            ],
            "3 function slot(s)",
        ),
        (
            vec![
                "create",
                "--slot",
                "1",
                "--nqn",
                &nqn(0),
                "--ns",
                "ram:4MiB",
            ],
            "busy",
        ),
        (
            vec![
                "create", "--slot", "2", "--nqn", "nqn.x", "--ns", "ram:1000",
            ],
            "multiple of 512",
        ),
    ] {
        let r = function(&addr, &args);
        assert_ne!(r.code, 0, "{args:?}: {r:?}");
        assert!(r.stderr.contains(why), "{args:?}: {r:?}");
    }
    assert_eq!(slots(&addr), before);
    malformed_frame_is_refused(&addr);
    assert_eq!(slots(&addr), before);

    // VF 1 removed while a host runs I/O on it: the host stops with an error, in bounded time.
    let bench = host_in_background(wins[1].path(), "5", &[], 60);
    std::thread::sleep(Duration::from_secs(5));
    let t0 = Instant::now();
    let r = function(&addr, &["remove", "--slot", "1"]);
    assert_eq!(r.code, 0, "{r:?}");
    eprintln!("removed in {:?}", t0.elapsed());
    assert!(
        r.stdout
            .contains(&format!("slot 1 (vf1): removed: subsystem {}", nqn(1))),
        "{r:?}"
    );
    let b = bench
        .join()
        .expect("the host's keelctl hung (killed after 100 s)");
    assert_ne!(b.code, 0, "the host's I/O did not fail: {b:?}");
    assert!(
        b.stderr
            .contains("the function was removed by the device (hot unplug: CSTS.CFS = 1"),
        "the host does not say the function was removed: {b:?}"
    );
    eprintln!(
        "host after removal: {}",
        b.stderr.lines().last().unwrap_or("")
    );
    fw.wait_for("pcie-fn1: slot free", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let s = slots(&addr);
    assert_eq!(s[1].state, SlotState::Free, "{s:?}");
    let r = host(wins[1].path(), &["identify"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("window header"), "{r:?}");
    let r = function(&addr, &["remove", "--slot", "1"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("no function to remove"), "{r:?}");
    let st = mgmt_status(&addr);
    assert!(
        !st.subsystems.iter().any(|x| x.nqn == nqn(1)),
        "{:?}",
        st.subsystems
    );

    // The others keep their data and keep working.
    for i in [0, 2] {
        assert_eq!(check(&wins[i], i).code, 0, "function {i} after the removal");
        host_ok(
            wins[i].path(),
            &[
                "verify",
                "--lba",
                "1000",
                "--count",
                "64",
                "--pattern",
                "0x77",
            ],
        );
    }

    // A new function on the freed slot: fresh storage.
    let r = function(
        &addr,
        &[
            "create",
            "--slot",
            "1",
            "--nqn",
            "nqn.2026-12.test.hotplug:vf1b",
            "--ns",
            "ram:8MiB",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let id = host_ok(wins[1].path(), &["identify"]);
    assert!(id.contains("nqn.2026-12.test.hotplug:vf1b"), "{id}");
    assert_ne!(
        check(&wins[1], 1).code,
        0,
        "the old function's data came back"
    );

    let c = fw.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(!c.contains(bad), "{bad:?} on the firmware console:\n{c}");
    }
    fw.kill();
}

/// A signed-protocol frame that is not a request: `Error { Malformed }`, nothing runs.
fn malformed_frame_is_refused(addr: &str) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"KMG1").unwrap();
    let _hello = read_frame(&mut s);
    // A CreateFunction variant tag followed by garbage and no signature.
    let payload = [3u8, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
    s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&payload).unwrap();
    let r = keel_mgmt::wire::decode_response(&read_frame(&mut s)).expect("a response");
    assert!(
        matches!(
            r.reply,
            keel_mgmt::wire::Reply::Error {
                code: keel_mgmt::wire::ErrorCode::Malformed,
                ..
            }
        ),
        "a malformed frame was not refused as malformed: {r:?}"
    );
}

fn read_frame(s: &mut std::net::TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("frame length");
    let mut b = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut b).expect("frame");
    b
}

const PF: &str = "nqn.2026-12.test.fnprov:pf";
const VF: &str = "nqn.2026-12.test.fnprov:vf1";

/// The test description (subsystem VOL, one RAM namespace) plus the PF on slot 0 (8 MiB
/// plain, 4 MiB encrypted, a write limit) and, with `vf`, a VF on `vf_slot`.
fn described(pf: bool, vf: Option<u16>) -> String {
    let mut t = description(&[("{ ram = \"8MiB\" }", "none")]);
    let mut sub = |nqn: &str, nss: &[(&str, &str, u16)]| {
        t.push_str(&format!("\n[[subsystem]]\nnqn = \"{nqn}\"\n"));
        for (size, enc, f) in nss {
            t.push_str(&format!(
                "\n[[namespace]]\nsubsystem = \"{nqn}\"\nbackend = {{ ram = \"{size}\" }}\n\
                 encryption = \"{enc}\"\nfunction = {f}\n"
            ));
        }
    };
    if pf {
        sub(PF, &[("8MiB", "none", 0), ("4MiB", "aes-256-xts", 0)]);
    }
    if let Some(slot) = vf {
        sub(VF, &[("8MiB", "none", slot)]);
    }
    if pf {
        t.push_str(
            "\n[[qos.function]]\nfunction = 0\nwrite_iops = { rate = 20000, burst = 200 }\n",
        );
    }
    t
}

/// Builds generation `g` of the description, keeping the NGUIDs (and keys) of `prev`.
fn generation(d: &Dir, g: u64, text: &str, prev: Option<&Path>) -> std::path::PathBuf {
    let toml = d.path(&format!("g{g}.toml"));
    std::fs::write(&toml, text).unwrap();
    match prev {
        None => build_from(d, &toml, g, &format!("g{g}.bundle")),
        Some(p) => {
            let out = d.path(&format!("g{g}.bundle"));
            let r = run_keelctl(
                None,
                &[
                    "provision",
                    "build",
                    toml.to_str().unwrap(),
                    "--key",
                    &dev_key(),
                    "--device-key",
                    keel_tests::provision::dev_device_key().to_str().unwrap(),
                    "--generation",
                    &g.to_string(),
                    "--keep-keys-from",
                    p.to_str().unwrap(),
                    "-o",
                    out.to_str().unwrap(),
                ],
            );
            assert_eq!(r.code, 0, "{r:?}");
            out
        }
    }
}

fn push(dev: &str, bundle: &Path) -> Run {
    run_keelctl(
        None,
        &[
            "provision",
            "push",
            bundle.to_str().unwrap(),
            "--device",
            dev,
            "--key",
            &dev_key(),
        ],
    )
}

/// `keelctl host verify --nsid NSID --lba 0 --count 128 --pattern 0x5a ARGS` succeeds.
fn pattern_5a(window: &Path, nsid: &str, args: &[&str]) {
    let mut all = vec!["verify", "--nsid", nsid, "--lba", "0", "--count", "128"];
    all.extend_from_slice(&["--pattern", "0x5a"]);
    all.extend_from_slice(args);
    host_ok(window, &all);
}

/// The NGUIDs `keelctl host identify --json` reports, in NSID order.
fn nguids(window: &Path) -> Vec<String> {
    let out = host_ok(window, &["identify", "--json"]);
    out.match_indices("\"nguid\": \"")
        .map(|(i, m)| out[i + m.len()..][..32].to_string())
        .collect()
}

#[test]
fn functions_in_the_device_description_are_pushed_live_and_come_back_after_a_reboot() {
    let d = Dir::new("fnprov");
    let wins: Vec<ScratchFile> = (0..2)
        .map(|i| ScratchFile::new(&format!("fnprov-win{i}"), 16 << 20))
        .collect();
    let w = |i: usize| wins[i].path().display().to_string();
    let g1 = generation(&d, 1, &described(false, None), None);
    let fl = flash_with(&d, &[&g1]);
    let (mut q, _nvmf, dev) = boot_flash(&fl, &["--window", &w(0), "--window", &w(1)]);
    assert!(slots(&dev).iter().all(|x| x.state == SlotState::Free));

    // Generation 2 adds the PF: created live, its namespaces through the window.
    let g2 = generation(&d, 2, &described(true, None), Some(&g1));
    let r = push(&dev, &g2);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains(&format!("{PF} namespace 2")), "{r:?}");
    let s = slots(&dev);
    assert_eq!(
        (s[0].state, s[0].subsystem.as_str(), s[0].origin.as_str()),
        (SlotState::Live, PF, "pushed"),
        "{s:?}"
    );
    assert_eq!(s[0].limits[0].per_sec, 20000);
    let id = host_ok(wins[0].path(), &["identify"]);
    assert!(id.contains(PF), "{id}");
    let pf_nguids = nguids(wins[0].path());
    assert_eq!(pf_nguids.len(), 2, "{pf_nguids:?}");
    for nsid in ["1", "2"] {
        pattern_5a(wins[0].path(), nsid, &[]);
    }

    // The PF's host keeps writing while generation 3 adds a VF and generation 4 removes it:
    // no I/O error on the PF.
    let bench = host_in_background(wins[0].path(), "10", &["--nsid", "2"], 8);
    std::thread::sleep(Duration::from_secs(1));
    let g3 = generation(&d, 3, &described(true, Some(1)), Some(&g2));
    let r = push(&dev, &g3);
    assert_eq!(r.code, 0, "{r:?}");
    let id = host_ok(wins[1].path(), &["identify"]);
    assert!(id.contains(VF), "{id}");
    let vf_nguid = nguids(wins[1].path());
    let g4 = generation(&d, 4, &described(true, None), Some(&g3));
    let r = push(&dev, &g4);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.contains(VF),
        "the report names the removed VF: {r:?}"
    );
    let b = bench.join().expect("the PF's bench hung");
    assert_eq!(b.code, 0, "the PF's I/O failed during the pushes: {b:?}");
    q.wait_for("pcie-fn1: slot free", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));

    // A bad description (a function on a slot the device does not have): refused, the
    // generation in force and the slots stay.
    let before = slots(&dev);
    let g5 = generation(&d, 5, &described(true, Some(7)), Some(&g4));
    let r = push(&dev, &g5);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("the device has 2 function slot(s)"),
        "{r:?}"
    );
    assert_eq!(slots(&dev), before);
    assert_eq!(mgmt_status(&dev).generation, 4);
    pattern_5a(wins[0].path(), "1", &["--read-only"]);
    q.kill();

    // A reboot: generation 4 from flash; the PF is back with the same NGUIDs, slot 1 free.
    let (mut q, _nvmf, dev) = boot_flash(&fl, &["--window", &w(0), "--window", &w(1)]);
    let s = slots(&dev);
    assert_eq!(
        (s[0].state, s[0].subsystem.as_str(), s[1].state),
        (SlotState::Live, PF, SlotState::Free),
        "{s:?}"
    );
    assert_eq!(nguids(wins[0].path()), pf_nguids);
    // A VF created again on slot 1 with the same NQN and NSID: new NGUID, encrypted data
    // written and read back.
    let r = function(
        &dev,
        &[
            "create",
            "--slot",
            "1",
            "--nqn",
            VF,
            "--ns",
            "ram:8MiB,aes-128-xts",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let again = nguids(wins[1].path());
    assert_eq!(again.len(), 1);
    assert_ne!(again, vf_nguid, "the NGUID of the removed VF came back");
    assert!(!pf_nguids.contains(&again[0]));
    host_ok(
        wins[1].path(),
        &[
            "verify",
            "--lba",
            "0",
            "--count",
            "128",
            "--pattern",
            "0x33",
        ],
    );
    let c = q.console();
    for bad in ["*** keel", "panic", "exception", "boot failed"] {
        assert!(!c.contains(bad), "{bad:?} on the firmware console:\n{c}");
    }
    q.kill();
}
