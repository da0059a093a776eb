//! The management endpoint of the real firmware in QEMU, through `keelctl`: status (text and
//! JSON, counters that follow `keelctl nvme write`), a captured request replayed and a request
//! signed with another key both refused (and logged), `/metrics` accepted by
//! `promtool check metrics`, a refused push that leaves the configuration alone, and a reboot
//! that answers first and then boots the firmware again.
//!
//! The device trusts the development provisioning key built into the image
//! (`qemu/dev-keys/provision.key`) while no bundle is provisioned.

use keel_host_tools::nvme::{Controller, Params};
use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, ScratchFile, build_bundle, build_release_keelctl, free_port,
    keelctl_ok, namespaces_in_status, root, run_keelctl,
};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

fn dev_key() -> String {
    root()
        .join("qemu/dev-keys/provision.key")
        .display()
        .to_string()
}

/// The number after `"field": ` at its first occurrence after `after`.
fn json_u64(json: &str, after: &str, field: &str) -> u64 {
    let start = json
        .find(after)
        .unwrap_or_else(|| panic!("{after} not in {json}"));
    let key = format!("\"{field}\": ");
    let at = json[start..]
        .find(&key)
        .unwrap_or_else(|| panic!("{field} not in {json}"))
        + start
        + key.len();
    json[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

fn boot(extra: &[&str]) -> (Qemu, String, String) {
    let mport = free_port();
    let nport = free_port();
    let mut args = vec![
        "--mgmt-port".to_string(),
        mport.to_string(),
        "--nvmf-port".to_string(),
        nport.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut q = Qemu::boot(Build::Release, &args);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (
        q,
        format!("127.0.0.1:{mport}"),
        format!("127.0.0.1:{nport}"),
    )
}

#[test]
fn status_replay_wrong_key_metrics_and_refused_push() {
    let (mut q, dev, nvmf) = boot(&[]);
    let key = dev_key();

    // Status as a table.
    let text = keelctl_ok(&["status", "--device", &dev, "--key", &key]);
    for want in [
        "board:       qemu-virt",
        "config:      generation 0 from boot arguments",
        "nqn.2026-11.dev.keel:default",
        "256MiB",
        "READ p50/p99/p99.9",
    ] {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }

    // JSON, then a write through NVMe/TCP, then JSON again: the counters moved.
    let before = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    assert!(before.contains("\"board\": \"qemu-virt\""), "{before}");
    let w0 = json_u64(&before, "\"nsid\": 1", "writes");
    let b0 = json_u64(&before, "\"nsid\": 1", "write_bytes");
    let data = ScratchFile::new("mgmt-write.bin", 0);
    std::fs::write(data.path(), vec![0xa5u8; 8192]).unwrap();
    let p = data.path().display().to_string();
    keelctl_ok(&[
        "nvme", "write", "--addr", &nvmf, "--nsid", "1", "--lba", "8", "-i", &p,
    ]);
    let after = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    let w1 = json_u64(&after, "\"nsid\": 1", "writes");
    let b1 = json_u64(&after, "\"nsid\": 1", "write_bytes");
    assert!(w1 > w0, "writes {w0} -> {w1}");
    assert_eq!(b1 - b0, 8192, "write_bytes {b0} -> {b1}");
    assert!(
        json_u64(&after, "write_latency", "count") >= w1,
        "write latency samples: {after}"
    );

    // A connected host with two I/O queues shows as a controller and as connections.
    let host = "nqn.2014-08.org.nvmexpress:uuid:0f0e0d0c-0b0a-0908-0706-050403020100";
    let ctrl = Controller::connect(Params {
        timeout: Duration::from_secs(30),
        ..Params::new(nvmf.clone(), "nqn.2026-11.dev.keel:default", host)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    ctrl.set_io_queues(2).unwrap();
    let q1 = ctrl.io_queue(1, 16).unwrap();
    let q2 = ctrl.io_queue(2, 16).unwrap();
    let text = keelctl_ok(&["status", "--device", &dev, "--key", &key]);
    assert!(
        text.contains("connections: 3 NVMe/TCP, 1 controller(s)"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.contains(host))
        .unwrap_or_else(|| panic!("no controller row in:\n{text}"));
    assert!(row.contains(" tcp ") && row.contains(" 2 "), "{row}");
    let m = keelctl_ok(&["metrics", "--device", &dev]);
    assert!(
        m.contains(&format!("transport=\"tcp\",host=\"{host}\"}} 2\n")),
        "{m}"
    );
    drop((q1, q2, ctrl));

    // A captured request, replayed on a new connection, is refused.
    let saved = ScratchFile::new("mgmt-status.req", 0);
    let sp = saved.path().display().to_string();
    keelctl_ok(&[
        "status",
        "--device",
        &dev,
        "--key",
        &key,
        "--save-request",
        &sp,
    ]);
    let out = run_keelctl(None, &["mgmt", "replay", &sp, "--device", &dev]);
    assert_eq!(out.code, 1, "the replay was not refused");
    assert!(out.stdout.contains("bad signature"));
    q.wait_for("mgmt: request refused", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));

    // A request signed with another key is refused.
    let other = ScratchFile::new("mgmt-other.key", 0);
    let _ = std::fs::remove_file(other.path());
    let op = other.path().display().to_string();
    keelctl_ok(&["keygen", "-o", &op, "--no-device-key"]);
    let out = run_keelctl(None, &["status", "--device", &dev, "--key", &op]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("device refused the request (bad signature)"),
        "wrong-key request not refused as such"
    );
    let _ = std::fs::remove_file(format!("{op}.pub"));

    // A bundle that is not one is refused with the device's message; nothing changed.
    let junk = ScratchFile::new("mgmt-junk.bundle", 0);
    std::fs::write(junk.path(), b"definitely not a bundle").unwrap();
    let jp = junk.path().display().to_string();
    let out = run_keelctl(
        None,
        &["provision", "push", &jp, "--device", &dev, "--key", &key],
    );
    assert_eq!(out.code, 1);
    let err = &out.stderr;
    assert!(err.contains("the device refused the bundle"), "{err}");
    let now = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    assert!(now.contains("\"generation\": 0"), "{now}");

    // Metrics: promtool's checker accepts them; the write shows.
    let metrics = keelctl_ok(&["metrics", "--device", &dev]);
    assert!(
        metrics.contains(&format!(
            "keel_namespace_written_bytes_total{{subsystem=\"nqn.2026-11.dev.keel:default\",namespace=\"1\",transport=\"tcp\"}} {b1}"
        )),
        "{metrics}"
    );
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(metrics.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => eprintln!(
            "SKIPPED promtool check: promtool not runnable ({e}); tests/run installs it \
             (Debian package prometheus)"
        ),
    }

    // Other paths and methods on the HTTP side.
    let get = |req: &str| {
        let mut s = std::net::TcpStream::connect(&dev).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(get("GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(get("POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
    let c = q.console();
    assert!(!c.contains("panicked"), "{c}");
}

#[test]
fn reboot_answers_then_boots_again() {
    // -action reboot=reset overrides qemu/run's -no-reboot: the reset boots the firmware again.
    let (mut q, dev, _) = boot(&["--", "-action", "reboot=reset"]);
    let key = dev_key();
    let out = keelctl_ok(&["reboot", "--device", &dev, "--key", &key]);
    assert!(out.contains("rebooting"), "{out}");
    q.wait_for("mgmt: reboot requested", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("no second boot after the reboot request: {e}"));
    // The new boot answers (with a fresh challenge, like any connection).
    let mut text = String::new();
    for _ in 0..20 {
        let o = run_keelctl(
            None,
            &["status", "--device", &dev, "--key", &key, "--timeout", "5"],
        );
        if o.code == 0 {
            text = o.stdout.clone();
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(text.contains("qemu-virt"), "no status after the reboot");
    assert_eq!(q.console().matches("keel: ready").count(), 2);
}

#[test]
fn hostile_clients_do_not_lock_the_operator_out() {
    use keel_host_tools::mgmt::client::Client;
    use keel_host_tools::mgmt::keel_mgmt::wire::{ErrorCode, Reply, frame};
    let (q, dev, _) = boot(&[]);
    let key = dev_key();
    let t = Duration::from_secs(10);

    // Connections that never speak fill every session slot (and more).
    let idle: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(&dev).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Neither protocol: closed without a word.
    let mut g = std::net::TcpStream::connect(&dev).unwrap();
    g.set_read_timeout(Some(t)).unwrap();
    g.write_all(b"\x16\x03\x01\x02\x00garbage").unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(g.read(&mut buf), Ok(0) | Err(_)),
        "garbage got an answer"
    );
    // A frame length above the limit: one error, then the device closes.
    let mut c = Client::connect(&dev, t).unwrap();
    match c.exchange(&u32::MAX.to_le_bytes()).unwrap() {
        Reply::Error { code, closing, .. } => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert!(closing);
        }
        other => panic!("{other:?}"),
    }
    assert!(
        c.exchange(&frame(b"x")).is_err(),
        "still open after TooLarge"
    );
    // Malformed frames: the third closes the connection.
    let mut c = Client::connect(&dev, t).unwrap();
    for i in 1..=3 {
        match c.exchange(&frame(&[0xee; 100])).unwrap() {
            Reply::Error { code, closing, .. } => {
                assert_eq!(code, ErrorCode::Malformed);
                assert_eq!(closing, i == 3);
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        c.exchange(&frame(b"x")).is_err(),
        "still open after 3 failures"
    );
    // The operator still gets in, and an HTTP client too.
    let text = keelctl_ok(&["status", "--device", &dev, "--key", &key]);
    assert!(text.contains("qemu-virt"));
    assert!(keelctl_ok(&["metrics", "--device", &dev]).contains("keel_up 1"));
    drop(idle);
    let c = q.console();
    assert!(c.contains("the least active one is reset"), "{c}");
    assert!(
        !c.contains("panicked") && !c.contains("CPU exception"),
        "{c}"
    );
}

const VOL: &str = "nqn.2026-11.dev.keel:vol0";

fn description(namespaces: &[&str]) -> String {
    let mut t =
        format!("[network]\ndhcp = true\n\n[[subsystem]]\nnqn = \"{VOL}\"\nallowed_hosts = []\n");
    for ram in namespaces {
        t.push_str(&format!(
            "\n[[namespace]]\nsubsystem = \"{VOL}\"\nbackend = {{ ram = \"{ram}\" }}\nencryption = \"none\"\n"
        ));
    }
    t
}

#[test]
fn push_through_keelctl_applies_and_refuses_an_old_generation() {
    let key = dev_key();
    let elf = keel_tests::image(Build::Release).with_extension("");
    let one = ScratchFile::new("mgmt-one.toml", 0);
    std::fs::write(one.path(), description(&["16MiB"])).unwrap();
    let two = ScratchFile::new("mgmt-two.toml", 0);
    std::fs::write(two.path(), description(&["16MiB", "8MiB"])).unwrap();
    let bundle = ScratchFile::new("mgmt-two.bundle", 0);
    let bp = bundle.path().display().to_string();

    build_release_keelctl();
    let mport = free_port();
    let mut q = Qemu::start(&[
        "--elf".to_string(),
        elf.display().to_string(),
        "--config".to_string(),
        one.path().display().to_string(),
        "--mgmt-port".to_string(),
        mport.to_string(),
    ]);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let dev = format!("127.0.0.1:{mport}");

    let before = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    let generation = json_u64(&before, "", "generation");
    assert!(generation > 0, "{before}");
    assert!(
        before.contains("\"config_source\": \"flash copy"),
        "{before}"
    );
    assert_eq!(namespaces_in_status(&before), 1, "{before}");

    // A newer generation with one more namespace: applied live and reported.
    let next = (generation + 1).to_string();
    build_bundle(two.path(), &key, generation + 1, &bp);
    let report = keelctl_ok(&["provision", "push", &bp, "--device", &dev, "--key", &key]);
    assert!(
        report.contains(&format!("applied: generation {next} now in force")),
        "{report}"
    );
    assert!(
        report.contains(&format!("added: {VOL} namespace 2")),
        "{report}"
    );
    let after = keelctl_ok(&["status", "--device", &dev, "--key", &key]);
    assert!(
        after.contains(&format!("config:      generation {next} from push")),
        "{after}"
    );
    assert!(after.contains("namespaces (2)"), "{after}");

    // The same bundle again: not newer, refused with the device's message; nothing changes.
    let out = run_keelctl(
        None,
        &["provision", "push", &bp, "--device", &dev, "--key", &key],
    );
    assert_eq!(out.code, 1);
    let err = &out.stderr;
    assert!(err.contains("the device refused the bundle"), "{err}");
    let again = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    assert_eq!(json_u64(&again, "", "generation"), generation + 1);
    assert_eq!(namespaces_in_status(&again), 2, "{again}");
}
