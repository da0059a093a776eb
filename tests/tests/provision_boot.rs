//! The firmware side of provisioning, in QEMU: a bundle built from a TOML description with
//! `keelctl provision build`, flashed with `keelctl image pack` + `keelctl flash` into a pflash
//! file, boots from flash and serves the provisioned namespaces (plain and encrypted, checked
//! with `keelctl nvme`); a damaged or refused newer configuration copy falls back to the
//! older one; a bundle that is tampered with, signed with another key or unsigned is refused
//! with a console message and the boot arguments are used; a live push adds a namespace that an
//! already connected host sees (`keelctl nvme watch`), is persisted in flash and survives a
//! reboot, while an older or tampered bundle is refused and the configuration stays; a later
//! push removes the namespace live (the host hears of it) and overwrites the older copy.
//!
//! The firmware trusts the development provisioning key (`qemu/dev-keys`), and `qemu/run`
//! attaches the development device identity to flash boots.

use keel_host_tools::provision::keel_provision::{self as kp, flash};
use keel_tests::provision::{
    Dir, VOL, boot_flash, build_from, bundle, description, dev_device_key, dev_key, flash_with,
};
use keel_tests::{Qemu, keelctl, keelctl_ok, run_keelctl, status_nsids};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// JSON without whitespace (the outputs checked hold no strings with spaces that matter).
fn compact(json: &str) -> String {
    json.split_whitespace().collect()
}

/// Every number after `"field":` in a JSON text, in order.
fn numbers(json: &str, field: &str) -> Vec<u64> {
    let c = compact(json);
    let key = format!("\"{field}\":");
    c.match_indices(&key)
        .filter_map(|(i, _)| {
            c[i + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .collect()
}

/// NSIDs and sizes `keelctl nvme identify --json` reports for a subsystem.
fn namespaces(addr: &str, nqn: &str) -> Vec<(u64, u64)> {
    let out = keelctl_ok(&["nvme", "identify", "--addr", addr, "--nqn", nqn, "--json"]);
    let ns = &out[out.find("\"namespaces\"").expect("namespaces")..];
    numbers(ns, "nsid")
        .into_iter()
        .zip(numbers(ns, "size_bytes"))
        .collect()
}

/// Rewrites configuration copy `copy` of a flash file with `payload` under `sequence` (a
/// valid CRC: only the bundle inside can be refused).
fn write_copy(flash_path: &Path, copy: flash::ConfigCopy, sequence: u64, payload: &[u8]) {
    let mut f = std::fs::read(flash_path).expect("flash");
    let region = &mut f[copy.offset()..copy.offset() + flash::CONFIG_COPY_SIZE];
    region.fill(0xff);
    let enc = flash::encode_config_copy(sequence, payload).expect("fits");
    region[..enc.len()].copy_from_slice(&enc);
    std::fs::write(flash_path, f).expect("write flash");
}

#[test]
fn a_flashed_bundle_boots_and_serves_plain_and_encrypted_namespaces() {
    let d = Dir::new("serve");
    let disk = d.path("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .expect("disk");
    let b = bundle(
        &d,
        "b.bundle",
        1000,
        &[
            ("{ ram = \"32MiB\" }", "none"),
            (
                "{ drive = 0, nsid = 1, offset = \"0\", length = \"all\" }",
                "aes-256-xts",
            ),
        ],
    );
    let fl = flash_with(&d, &[&b]);
    let (mut q, addr, _) = boot_flash(&fl, &["--disk", disk.to_str().unwrap()]);
    let c = q.console();
    for want in [
        "identity: device key from flash bank 1",
        "config: copy A (sequence 1, generation 1000) in force",
        "nvmf: namespace 1 of nqn.2026-11.dev.keel:vol0 = RAM 32 MiB",
        "crypto: namespace 2 of nqn.2026-11.dev.keel:vol0 encrypted with aes-256-xts (key from the provisioned bundle)",
        "DEVELOPMENT KEY",
    ] {
        assert!(c.contains(want), "{want:?} missing:\n{c}");
    }
    assert!(!c.contains("using boot arguments"), "{c}");
    assert_eq!(namespaces(&addr, VOL), vec![(1, 32 << 20), (2, 16 << 20)]);
    for nsid in ["1", "2"] {
        keelctl_ok(&[
            "nvme", "verify", "--addr", &addr, "--nqn", VOL, "--nsid", nsid, "--lba", "0",
            "--count", "256",
        ]);
    }
    // A marker written to the encrypted namespace reads back, and is not in the disk file.
    let marker: Vec<u8> = b"KEEL-PROVISIONED-SECRET-MARKER!!"
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    std::fs::write(d.path("marker"), &marker).unwrap();
    keelctl_ok(&[
        "nvme",
        "write",
        "--addr",
        &addr,
        "--nqn",
        VOL,
        "--nsid",
        "2",
        "--lba",
        "64",
        "-i",
        &d.p("marker"),
    ]);
    keelctl_ok(&[
        "nvme",
        "read",
        "--addr",
        &addr,
        "--nqn",
        VOL,
        "--nsid",
        "2",
        "--lba",
        "64",
        "--count",
        "8",
        "-o",
        &d.p("back"),
    ]);
    assert_eq!(std::fs::read(d.path("back")).unwrap(), marker);
    q.kill();
    let raw = std::fs::read(&disk).unwrap();
    assert!(
        !raw.windows(32).any(|w| w == &marker[..32]),
        "plaintext found in the drive file"
    );
    assert!(
        raw[64 * 512..72 * 512].iter().any(|&b| b != 0),
        "ciphertext at its place"
    );
}

#[test]
fn a_damaged_or_refused_newer_copy_falls_back_to_the_older_one() {
    let d = Dir::new("fallback");
    let one = bundle(&d, "one.bundle", 10, &[("{ ram = \"8MiB\" }", "none")]);
    let two = bundle(
        &d,
        "two.bundle",
        20,
        &[
            ("{ ram = \"8MiB\" }", "none"),
            ("{ ram = \"4MiB\" }", "none"),
        ],
    );
    let fl = flash_with(&d, &[&one, &two]);

    // The newer copy (B, sequence 2) with a flipped payload byte: its CRC fails.
    let mut f = std::fs::read(&fl).unwrap();
    f[flash::ConfigCopy::B.offset() + flash::CONFIG_HEADER_LEN + 40] ^= 0x01;
    std::fs::write(&fl, &f).unwrap();
    let (mut q, addr, _) = boot_flash(&fl, &[]);
    let c = q.console();
    assert!(c.contains("config: copy B is damaged"), "{c}");
    assert!(
        c.contains("config: copy A (sequence 1, generation 10) in force"),
        "{c}"
    );
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20)]);
    q.kill();

    // The newer copy with a valid CRC around a tampered bundle: its signature fails.
    let mut tampered = std::fs::read(&two).unwrap();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x20;
    write_copy(&fl, flash::ConfigCopy::B, 2, &tampered);
    let (mut q, addr, _) = boot_flash(&fl, &[]);
    let c = q.console();
    assert!(
        c.contains("config: copy B (sequence 2) refused: bundle signature does not verify"),
        "{c}"
    );
    assert!(c.contains("trying the other copy"), "{c}");
    assert!(
        c.contains("config: copy A (sequence 1, generation 10) in force (fallback"),
        "{c}"
    );
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20)]);
    q.kill();
}

#[test]
fn tampered_wrong_key_and_unsigned_bundles_are_refused_for_the_boot_arguments() {
    let d = Dir::new("refused");
    let good = bundle(&d, "good.bundle", 5, &[("{ ram = \"8MiB\" }", "none")]);
    let good_bytes = std::fs::read(&good).unwrap();
    let fl = flash_with(&d, &[]);

    // Signed with another provisioning key.
    keelctl_ok(&["keygen", "-o", &d.p("other.key")]);
    std::fs::write(
        d.path("o.toml"),
        description(&[("{ ram = \"8MiB\" }", "none")]),
    )
    .unwrap();
    keelctl_ok(&[
        "provision",
        "build",
        &d.p("o.toml"),
        "--key",
        &d.p("other.key"),
        "--device-key",
        dev_device_key().to_str().unwrap(),
        "--generation",
        "5",
        "-o",
        &d.p("other.bundle"),
    ]);
    let other = std::fs::read(d.path("other.bundle")).unwrap();
    // Unsigned: the signature zeroed.
    let mut unsigned = good_bytes.clone();
    let n = unsigned.len();
    unsigned[n - 64..].fill(0);
    // Tampered: one body byte flipped.
    let mut tampered = good_bytes.clone();
    tampered[40] ^= 0x04;

    for (what, bytes, message) in [
        (
            "wrong key",
            &other,
            "bundle signature does not verify against the trusted provisioning key",
        ),
        ("unsigned", &unsigned, "bundle is not signed"),
        (
            "tampered",
            &tampered,
            "bundle signature does not verify against the trusted provisioning key",
        ),
    ] {
        write_copy(&fl, flash::ConfigCopy::A, 1, bytes);
        let (mut q, addr, _) = boot_flash(&fl, &[]);
        let c = q.console();
        assert!(
            c.contains(&format!("config: copy A (sequence 1) refused: {message}")),
            "{what}:\n{c}"
        );
        assert!(
            c.contains("config: no provisioned configuration; using boot arguments"),
            "{what}:\n{c}"
        );
        // The boot-argument default: one 256 MiB RAM namespace in the default subsystem.
        assert_eq!(
            namespaces(&addr, "nqn.2026-11.dev.keel:default"),
            vec![(1, 256 << 20)],
            "{what}"
        );
        q.kill();
    }
}

/// Waits (60 s at most) for a `keelctl nvme watch` to see its event and exit successfully;
/// returns what it printed. `what` names the failure.
fn finish_watch(watch: &mut std::process::Child, q: &Qemu, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = watch.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = watch.kill();
            panic!("keelctl nvme watch saw {what}:\n{}", q.console());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    watch
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "watch: {status}\n{out}");
    out
}

/// Starts `keelctl nvme watch --json` and returns once its AER is outstanding.
fn start_watch(addr: &str) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(keelctl())
        .args([
            "nvme",
            "watch",
            "--addr",
            addr,
            "--nqn",
            VOL,
            "--json",
            "--timeout",
            "120",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting keelctl nvme watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let err = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("watch: {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("waiting up to") => return (child, rx),
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("keelctl nvme watch did not start waiting: {e}");
            }
        }
    }
}

#[test]
fn a_live_push_reaches_a_connected_host_persists_and_refuses_rollback() {
    let d = Dir::new("push");
    let one = bundle(&d, "one.bundle", 100, &[("{ ram = \"8MiB\" }", "none")]);
    let two = bundle(
        &d,
        "two.bundle",
        200,
        &[
            ("{ ram = \"8MiB\" }", "none"),
            ("{ ram = \"4MiB\" }", "aes-128-xts"),
        ],
    );
    let fl = flash_with(&d, &[&one]);
    let (mut q, addr, dev) = boot_flash(&fl, &[]);
    let key = dev_key().display().to_string();
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20)]);

    // A host is connected and waits for an event; the push adds namespace 2.
    let (mut watch, _lines) = start_watch(&addr);
    let report = keelctl_ok(&[
        "provision",
        "push",
        two.to_str().unwrap(),
        "--device",
        &dev,
        "--key",
        &key,
    ]);
    assert!(report.contains("generation 200"), "{report}");
    assert!(report.contains(&format!("{VOL} namespace 2")), "{report}");
    let out = finish_watch(&mut watch, &q, "no event");
    assert!(
        out.contains("\"info\": \"namespace attribute changed\""),
        "{out}"
    );
    assert!(
        compact(&out).contains("\"changed_namespaces\":[2]"),
        "{out}"
    );
    let listed = &out[out.find("\"namespaces\":").expect("namespaces")..];
    assert_eq!(numbers(listed, "nsid"), vec![2], "{out}");
    assert_eq!(numbers(listed, "size_bytes"), vec![4 << 20], "{out}");
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20), (2, 4 << 20)]);
    keelctl_ok(&[
        "nvme", "verify", "--addr", &addr, "--nqn", VOL, "--nsid", "2", "--lba", "0", "--count",
        "64",
    ]);
    let c = q.console();
    assert!(
        c.contains("config: generation 200 written to flash copy B (sequence 2)"),
        "{c}"
    );

    // Older generation and a tampered bundle: refused, nothing changes.
    let status_before = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    let one_path = one.to_str().unwrap();
    let out = run_keelctl(
        None,
        &[
            "provision",
            "push",
            one_path,
            "--device",
            &dev,
            "--key",
            &key,
        ],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("rollback refused"), "{out:?}");
    let mut t = std::fs::read(&two).unwrap();
    t[50] ^= 1;
    std::fs::write(d.path("t.bundle"), &t).unwrap();
    let out = run_keelctl(
        None,
        &[
            "provision",
            "push",
            &d.p("t.bundle"),
            "--device",
            &dev,
            "--key",
            &key,
        ],
    );
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("signature does not verify"), "{out:?}");
    let status_after = keelctl_ok(&["status", "--device", &dev, "--key", &key, "--json"]);
    let gen_of = |s: &str| (numbers(s, "generation"), status_nsids(s));
    assert_eq!(gen_of(&status_before), (vec![200], vec![1, 2]));
    assert_eq!(gen_of(&status_after), gen_of(&status_before));
    let c = q.console();
    assert!(
        c.contains("config: push refused: bundle generation 100 is not newer"),
        "{c}"
    );
    q.kill();

    // Persisted: the flash holds generation 200 in copy B, and a reboot serves it.
    let f = std::fs::read(&fl).unwrap();
    let (a, b) = (
        &f[flash::ConfigCopy::A.offset()..][..flash::CONFIG_COPY_SIZE],
        &f[flash::ConfigCopy::B.offset()..][..flash::CONFIG_COPY_SIZE],
    );
    let payload = flash::choose_config(a, b).expect("a configuration");
    assert_eq!(kp::inspect(payload).expect("bundle").generation, 200);
    assert_eq!(payload, &std::fs::read(&two).unwrap()[..]);
    let (mut q, addr, dev2) = boot_flash(&fl, &[]);
    assert!(
        q.console()
            .contains("config: copy B (sequence 2, generation 200) in force"),
        "{}",
        q.console()
    );
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20), (2, 4 << 20)]);

    // Generation 300 drops namespace 2: removed live (a connected host hears of it), written
    // over the older copy A with sequence 3.
    let three = bundle(&d, "three.bundle", 300, &[("{ ram = \"8MiB\" }", "none")]);
    let (mut watch, _lines) = start_watch(&addr);
    let report = keelctl_ok(&[
        "provision",
        "push",
        three.to_str().unwrap(),
        "--device",
        &dev2,
        "--key",
        &key,
    ]);
    assert!(report.contains("generation 300"), "{report}");
    let out = finish_watch(&mut watch, &q, "no removal");
    assert!(
        compact(&out).contains("\"changed_namespaces\":[2]"),
        "{out}"
    );
    assert!(compact(&out).contains("\"namespaces\":[]"), "{out}");
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20)]);
    assert!(
        q.console()
            .contains("config: generation 300 written to flash copy A (sequence 3)"),
        "{}",
        q.console()
    );
    q.kill();
}

#[test]
fn a_provisioned_function_network_and_management_key_are_applied() {
    let d = Dir::new("function");
    keelctl_ok(&["keygen", "-o", &d.p("op.key"), "--no-device-key"]);
    let op_pub = std::fs::read_to_string(d.path("op.key.pub")).unwrap();
    let toml = format!(
        "[network]\naddress = \"10.0.2.15/24\"\ngateway = \"10.0.2.2\"\n\n\
         [[subsystem]]\nnqn = \"{VOL}\"\nmodel = \"Provisioned volume\"\n\n\
         [[namespace]]\nsubsystem = \"{VOL}\"\nbackend = {{ ram = \"8MiB\" }}\nfunction = 0\n\n\
         [[namespace]]\nsubsystem = \"{VOL}\"\nbackend = {{ ram = \"4MiB\" }}\n\n\
         [management]\nport = 7000\nauthorized_key = \"{}\"\n",
        op_pub.trim()
    );
    std::fs::write(d.path("f.toml"), toml).unwrap();
    build_from(&d, &d.path("f.toml"), 7, "f.bundle");
    let fl = flash_with(&d, &[&d.path("f.bundle")]);
    let window = d.path("win0");
    std::fs::File::create(&window)
        .and_then(|f| f.set_len(64 << 20))
        .expect("window");
    let (mut q, addr, dev) = boot_flash(&fl, &["--window", window.to_str().unwrap()]);
    let c = q.console();
    assert!(
        c.contains(&format!(
            "subsystem {VOL}, a controller of its 2 namespace(s)"
        )),
        "{c}"
    );
    assert!(
        c.contains("pcie-fn0: emulated NVMe function on window"),
        "{c}"
    );
    // Static address: no DHCP, and the NVMe/TCP port is reachable on it.
    assert!(!c.contains("net: DHCP address"), "{c}");
    assert!(c.contains("nvme/tcp 10.0.2.15:4420"), "{c}");
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20), (2, 4 << 20)]);
    // The function is a controller of the subsystem that names it: it sees both namespaces.
    let text = keelctl_ok(&["host", "--window", window.to_str().unwrap(), "identify"]);
    for want in [
        &format!("subnqn    {VOL}")[..],
        "mn        Provisioned volume",
        "Namespace 1",
        "Namespace 2",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    // Management answers the bundle's key, not the provisioning key.
    let s = keelctl_ok(&[
        "status",
        "--device",
        &dev,
        "--key",
        &d.p("op.key"),
        "--json",
    ]);
    assert_eq!(numbers(&s, "generation"), vec![7], "{s}");
    let refused = run_keelctl(
        None,
        &[
            "status",
            "--device",
            &dev,
            "--key",
            dev_key().to_str().unwrap(),
            "--timeout",
            "10",
        ],
    );
    assert_eq!(refused.code, 1, "the provisioning key must not be accepted");
    assert!(
        refused
            .stderr
            .contains("device refused the request (bad signature)"),
        "{refused:?}"
    );

    // A push whose new namespace cannot be built (512 GiB of RAM on a 1 GiB machine): the
    // firmware says why and keeps serving; the rest of the push applies.
    let big = format!(
        "{}\n[[namespace]]\nsubsystem = \"{VOL}\"\nnsid = 3\nbackend = {{ ram = \"512GiB\" }}\n",
        std::fs::read_to_string(d.path("f.toml")).unwrap()
    );
    std::fs::write(d.path("big.toml"), big).unwrap();
    build_from(&d, &d.path("big.toml"), 8, "big.bundle");
    let report = keelctl_ok(&[
        "provision",
        "push",
        &d.p("big.bundle"),
        "--device",
        &dev,
        "--key",
        &d.p("op.key"),
    ]);
    assert!(report.contains("namespace 3 of"), "{report}");
    assert!(report.contains("not served"), "{report}");
    assert!(
        q.console()
            .contains("storage: RAM namespace of 524288 MiB does not fit the free heap"),
        "{}",
        q.console()
    );
    assert_eq!(namespaces(&addr, VOL), vec![(1, 8 << 20), (2, 4 << 20)]);
    q.kill();
}
