//! `keelctl keygen`, `provision check|build|verify`, `image pack|info` and `flash`: the real
//! binary on real files, bundles opened through the library as the device will, and a packed,
//! flashed image booted from QEMU's pflash. Every `keelctl` and QEMU run is bounded in time.

use keel_host_tools::provision::keel_provision::{self as kp, BundleError, flash};
use keel_host_tools::provision::keys;
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, Run, root, run_keelctl};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The release firmware ELF (built once per test process by the harness).
fn firmware_elf() -> PathBuf {
    let raw = keel_tests::image(Build::Release);
    raw.with_extension("")
}

/// A scratch directory under the target directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let d = root()
            .join("target/qemu-tests/scratch")
            .join(format!("{}-prov-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Dir(d)
    }

    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    fn run(&self, args: &[&str]) -> Run {
        run_keelctl(Some(&self.0), args)
    }

    /// Runs and expects success.
    fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 0, "keelctl {args:?}: {r:?}");
        r
    }

    /// Runs and expects exit code 1 with `needle` on stderr.
    fn fails(&self, args: &[&str], needle: &str) -> Run {
        let r = self.run(args);
        assert_eq!(r.code, 1, "keelctl {args:?} should fail: {r:?}");
        assert!(
            r.stderr.contains(needle),
            "keelctl {args:?}: expected {needle:?}: {r:?}"
        );
        r
    }

    fn write(&self, f: &str, text: &str) {
        std::fs::write(self.path(f), text).expect("writing a test file");
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// The README's example description, with the management key filled in.
fn description(pubkey: &str) -> String {
    format!(
        r#"# A Keel device: one subsystem, an encrypted drive slice and a RAM namespace.
[network]
dhcp = true                       # or: address = "10.0.2.15/24", gateway = "10.0.2.2"

[[subsystem]]
nqn = "nqn.2026-11.dev.keel:vol0"
serial = "KEEL0001"
allowed_hosts = []                # empty: any host

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = {{ drive = 0, nsid = 1, offset = "0", length = "1GiB" }}
encryption = "aes-256-xts"

[[namespace]]
subsystem = "nqn.2026-11.dev.keel:vol0"
backend = {{ ram = "256MiB" }}
encryption = "none"

[management]
port = 7000
authorized_key = "{pubkey}"
"#
    )
}

fn keygen(d: &Dir) -> String {
    d.ok(&["keygen", "-o", "prov.key"]);
    std::fs::read_to_string(d.path("prov.key.pub"))
        .expect("reading KEY.pub")
        .trim()
        .to_string()
}

#[test]
fn keygen_writes_private_files_0600_and_never_overwrites() {
    let d = Dir::new("keygen");
    let r = d.ok(&["keygen", "-o", "prov.key"]);
    assert!(r.stdout.contains("prov.key.pub"), "{r:?}");
    assert_eq!(mode(&d.path("prov.key")), 0o600);
    assert_eq!(mode(&d.path("prov.key.device")), 0o600);
    assert_eq!(mode(&d.path("prov.key.pub")) & 0o600, 0o600);
    let pk = keys::read_public_key(&d.path("prov.key.pub")).expect("public key");
    let sk = keys::read_signing_key(&d.path("prov.key")).expect("signing key");
    assert_eq!(sk.verifying_key(), pk);
    keys::read_device_key(&d.path("prov.key.device")).expect("device key");
    // Kinds are not interchangeable.
    assert!(keys::read_device_key(&d.path("prov.key")).is_err());
    assert!(keys::read_public_key(&d.path("prov.key")).is_err());

    let before = std::fs::read(d.path("prov.key")).expect("read");
    d.fails(&["keygen", "-o", "prov.key"], "exists");
    assert_eq!(
        std::fs::read(d.path("prov.key")).expect("read"),
        before,
        "not overwritten"
    );
    d.ok(&["keygen", "-o", "prov.key", "--force"]);
    assert_ne!(
        std::fs::read(d.path("prov.key")).expect("read"),
        before,
        "replaced with --force"
    );
    assert_eq!(mode(&d.path("prov.key")), 0o600);

    d.ok(&["keygen", "-o", "ops.key", "--no-device-key"]);
    assert!(!d.path("ops.key.device").exists());
    d.ok(&["keygen", "-o", "ops2.key", "--device-key", "dev7.key"]);
    assert_eq!(mode(&d.path("dev7.key")), 0o600);
}

#[test]
fn check_names_the_line_and_the_field() {
    let d = Dir::new("check");
    let pk = keygen(&d);
    let good = description(&pk);
    d.write("dev.toml", &good);
    let r = d.ok(&["provision", "check", "dev.toml"]);
    assert!(
        r.stdout
            .contains("ok: 1 subsystem(s), 2 namespace(s) (1 encrypted)"),
        "{r:?}"
    );

    let cases: &[(&str, &str, &str)] = &[
        // (replace, with, "line N: field")
        (
            "encryption = \"none\"",
            "encryption = \"rot13\"",
            "line 18: namespace[1].encryption",
        ),
        (
            "length = \"1GiB\"",
            "length = \"1GB\"",
            "line 12: namespace[0].backend.length",
        ),
        (
            "nqn = \"nqn.2026-11.dev.keel:vol0\"",
            "nqn = \"vol0\"",
            "line 6: subsystem[0].nqn",
        ),
        (
            "serial = \"KEEL0001\"",
            "serial = \"KEEL0001KEEL0001KEEL0001\"",
            "line 7: subsystem[0].serial",
        ),
        ("port = 7000", "port = 4420", "line 21: management.port"),
        ("port = 7000", "prot = 7000", "line 21: prot"),
        ("dhcp = true ", "dhcp = 1 ", "line 3: dhcp"),
        (
            "subsystem = \"nqn.2026-11.dev.keel:vol0\"\nbackend = { ram",
            "subsystem = \"nqn.2026-11.dev.keel:vol9\"\nbackend = { ram",
            "line 16: namespace[1].subsystem",
        ),
        (&pk[..], &pk[..10], "line 22: management.authorized_key"),
    ];
    for (from, to, needle) in cases {
        assert!(good.contains(from), "{from}");
        d.write("bad.toml", &good.replacen(from, to, 1));
        d.fails(
            &["provision", "check", "bad.toml"],
            &format!("bad.toml: {needle}"),
        );
    }
    // Overlapping slices of one drive namespace.
    let overlap = good.replace(
        "backend = { ram = \"256MiB\" }",
        "backend = { drive = 0, nsid = 1, offset = \"512MiB\", length = \"all\" }",
    );
    d.write("bad.toml", &overlap);
    d.fails(
        &["provision", "check", "bad.toml"],
        "line 17: namespace[1].backend: overlaps namespace[0]",
    );
    // Duplicate NSIDs.
    let dup = good.replace("encryption = \"none\"", "encryption = \"none\"\nnsid = 1");
    d.write(
        "bad.toml",
        &dup.replace(
            "encryption = \"aes-256-xts\"",
            "encryption = \"aes-256-xts\"\nnsid = 1",
        ),
    );
    d.fails(
        &["provision", "check", "bad.toml"],
        "namespace[1].nsid: duplicate NSID 1",
    );
    d.fails(&["provision", "check", "missing.toml"], "missing.toml");
}

#[test]
fn build_then_open_as_the_device_does() {
    let d = Dir::new("build");
    let pk = keygen(&d);
    d.write("dev.toml", &description(&pk));
    let r = d.ok(&[
        "provision",
        "build",
        "dev.toml",
        "--key",
        "prov.key",
        "--device-key",
        "prov.key.device",
        "--generation",
        "7",
        "-o",
        "b7.bundle",
    ]);
    assert!(r.stdout.contains("generation 7"), "{r:?}");
    let bytes = std::fs::read(d.path("b7.bundle")).expect("bundle");
    let trusted = keys::read_public_key(&d.path("prov.key.pub")).expect("pub");
    let dk = keys::read_device_key(&d.path("prov.key.device")).expect("device key");
    let c = kp::verify_and_open(&bytes, &trusted, &dk, 6).expect("opens");
    assert_eq!(c.generation, 7);
    assert_eq!(c.device, kp::parse_toml(&description(&pk)).expect("parses"));
    assert_eq!(c.keys[0].as_ref().map(|k| k.len()), Some(64));
    assert!(c.keys[1].is_none());
    // Rollback, another device, another provisioning key.
    assert!(matches!(
        kp::verify_and_open(&bytes, &trusted, &dk, 7),
        Err(BundleError::Rollback { .. })
    ));
    d.ok(&["keygen", "-o", "other.key"]);
    let other_dk = keys::read_device_key(&d.path("other.key.device")).expect("device key");
    assert_eq!(
        kp::verify_and_open(&bytes, &trusted, &other_dk, 0).unwrap_err(),
        BundleError::KeyUnwrap { namespace: 0 }
    );
    let other_pk = keys::read_public_key(&d.path("other.key.pub")).expect("pub");
    assert_eq!(
        kp::verify_and_open(&bytes, &other_pk, &dk, 0).unwrap_err(),
        BundleError::BadSignature
    );

    let verify = [
        "provision",
        "verify",
        "b7.bundle",
        "--pub",
        "prov.key.pub",
        "--device-key",
        "prov.key.device",
    ];
    d.ok(&verify);
    let mut rolled = verify.to_vec();
    rolled.extend(["--current-generation", "7"]);
    d.fails(&rolled, "rollback refused");
    let mut tampered = bytes.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x10;
    std::fs::write(d.path("b7.bundle"), &tampered).expect("write");
    d.fails(&verify, "signature does not verify");

    // The default generation is the time: a later build is newer.
    let r = d.ok(&[
        "provision",
        "build",
        "dev.toml",
        "--key",
        "prov.key",
        "--device-key",
        "prov.key.device",
        "-o",
        "now.bundle",
    ]);
    let now = std::fs::read(d.path("now.bundle")).expect("bundle");
    let g = kp::inspect(&now).expect("inspect").generation;
    assert!(g > 1_700_000_000, "{r:?}");
    // An invalid description builds nothing.
    d.write(
        "bad.toml",
        &description(&pk).replace("aes-256-xts", "aes-999"),
    );
    d.fails(
        &[
            "provision",
            "build",
            "bad.toml",
            "--key",
            "prov.key",
            "--device-key",
            "prov.key.device",
            "-o",
            "x",
        ],
        "line 13",
    );
    assert!(!d.path("x").exists());
}

fn build_bundle(d: &Dir, generation: &str, out: &str) {
    d.ok(&[
        "provision",
        "build",
        "dev.toml",
        "--key",
        "prov.key",
        "--device-key",
        "prov.key.device",
        "--generation",
        generation,
        "-o",
        out,
    ]);
}

#[test]
fn pack_flash_and_describe() {
    let d = Dir::new("pack");
    let pk = keygen(&d);
    d.write("dev.toml", &description(&pk));
    let elf = firmware_elf();
    let elf = elf.to_str().expect("path");
    d.ok(&["image", "pack", elf, "--key", "prov.key", "-o", "fw.img"]);
    let img = std::fs::read(d.path("fw.img")).expect("image");
    assert_eq!(img.len(), flash::FLASH_SIZE);
    let raw = keel_host_tools::image::raw_from_elf_file(Path::new(elf)).expect("raw");
    assert_eq!(
        &img[..raw.bytes.len()],
        &raw.bytes[..],
        "slot A starts with the raw image at offset 0"
    );
    assert_eq!(&img[56..60], b"ARM\x64");

    // Flash into a new file: created as 64 MiB of erased flash.
    d.ok(&["flash", "fw.img", "--to", "dev.flash"]);
    assert_eq!(
        std::fs::metadata(d.path("dev.flash")).expect("stat").len(),
        flash::FLASH_SIZE as u64
    );
    let r = d.ok(&["image", "info", "dev.flash", "--pub", "prov.key.pub"]);
    assert!(
        r.stdout.contains("slot A at 0x0000000: Keel 0.1.0"),
        "{r:?}"
    );
    assert!(r.stdout.contains("for qemu-virt"), "{r:?}");
    assert!(
        r.stdout
            .contains("signature: valid, trusted key; payload: intact"),
        "{r:?}"
    );
    assert!(r.stdout.contains("slot B at 0x1ec0000: empty"), "{r:?}");
    assert!(r.stdout.contains("configuration in force: none"), "{r:?}");

    // Bundles go to the configuration copies in turn.
    build_bundle(&d, "5", "b5.bundle");
    build_bundle(&d, "6", "b6.bundle");
    let r = d.ok(&[
        "flash",
        "b5.bundle",
        "--to",
        "dev.flash",
        "--pub",
        "prov.key.pub",
    ]);
    assert!(
        r.stdout
            .contains("config A <- bundle generation 5 (sequence 1"),
        "{r:?}"
    );
    d.fails(&["flash", "b5.bundle", "--to", "dev.flash"], "not newer");
    let r = d.ok(&["flash", "b6.bundle", "--to", "dev.flash"]);
    assert!(
        r.stdout
            .contains("config B <- bundle generation 6 (sequence 2"),
        "{r:?}"
    );
    let r = d.ok(&["image", "info", "dev.flash"]);
    assert!(
        r.stdout
            .contains("configuration in force: copy B (sequence 2)"),
        "{r:?}"
    );

    // What the device reads: the newest copy; with it corrupted, the other one.
    let mut flashed = std::fs::read(d.path("dev.flash")).expect("flash");
    let (a, b) = keel_host_tools::image::config_regions(&flashed);
    assert_eq!(
        flash::choose_config(a, b),
        Some(&std::fs::read(d.path("b6.bundle")).expect("b6")[..])
    );
    flashed[flash::ConfigCopy::B.offset() + 100] ^= 1;
    std::fs::write(d.path("dev.flash"), &flashed).expect("write");
    let r = d.ok(&["image", "info", "dev.flash"]);
    assert!(r.stdout.contains("config B at 0x3f00000: invalid"), "{r:?}");
    assert!(
        r.stdout
            .contains("configuration in force: copy A (sequence 1)"),
        "{r:?}"
    );
    let (a, b) = keel_host_tools::image::config_regions(&flashed);
    let trusted = keys::read_public_key(&d.path("prov.key.pub")).expect("pub");
    let dk = keys::read_device_key(&d.path("prov.key.device")).expect("dk");
    let c = kp::verify_and_open(
        flash::choose_config(a, b).expect("a config"),
        &trusted,
        &dk,
        0,
    )
    .expect("opens");
    assert_eq!(c.generation, 5);
    // The next write replaces the corrupt copy.
    build_bundle(&d, "8", "b8.bundle");
    let r = d.ok(&["flash", "b8.bundle", "--to", "dev.flash"]);
    assert!(
        r.stdout
            .contains("config B <- bundle generation 8 (sequence 2"),
        "{r:?}"
    );

    // The update slot, and the firmware and configuration stay.
    let r = d.ok(&["flash", "fw.img", "--to", "dev.flash", "--slot", "b"]);
    assert!(r.stdout.contains("slot B <-"), "{r:?}");
    let r = d.ok(&["image", "info", "dev.flash", "--pub", "prov.key.pub"]);
    assert!(
        r.stdout.contains("slot B at 0x1ec0000: Keel 0.1.0"),
        "{r:?}"
    );
    assert_eq!(r.stdout.matches("payload: intact").count(), 2, "{r:?}");
    assert!(
        r.stdout
            .contains("configuration in force: copy B (sequence 2)"),
        "{r:?}"
    );

    // Signed by another key: refused with --pub; info reports it and exits 1.
    d.ok(&["keygen", "-o", "other.key"]);
    d.fails(
        &[
            "flash",
            "fw.img",
            "--to",
            "dev.flash",
            "--pub",
            "other.key.pub",
        ],
        "untrusted key",
    );
    let r = d.run(&["image", "info", "dev.flash", "--pub", "other.key.pub"]);
    assert_eq!(r.code, 1, "{r:?}");
    // Neither an image nor a bundle; a file too small for the layout.
    d.fails(
        &["flash", "dev.toml", "--to", "dev.flash"],
        "neither a flash image",
    );
    d.write("small.flash", "x");
    d.fails(&["flash", "fw.img", "--to", "small.flash"], "smaller than");
}

#[test]
fn an_image_for_another_board_is_refused() {
    let d = Dir::new("board");
    keygen(&d);
    let elf = firmware_elf();
    let elf = elf.to_str().expect("path");
    d.ok(&["image", "pack", elf, "--key", "prov.key", "-o", "qemu.img"]);
    d.ok(&[
        "image",
        "pack",
        elf,
        "--key",
        "prov.key",
        "--board",
        "bluefield-3",
        "-o",
        "bf3.img",
    ]);
    // An empty target is qemu-virt by default; one with qemu-virt firmware says so itself.
    d.fails(
        &["flash", "bf3.img", "--to", "new.flash"],
        "built for board `bluefield-3`, the target is `qemu-virt`",
    );
    d.ok(&["flash", "qemu.img", "--to", "dev.flash"]);
    let before = std::fs::read(d.path("dev.flash")).expect("flash");
    d.fails(&["flash", "bf3.img", "--to", "dev.flash"], "refused");
    assert!(
        std::fs::read(d.path("dev.flash")).expect("flash") == before,
        "target unchanged"
    );
    d.fails(
        &[
            "flash",
            "qemu.img",
            "--to",
            "dev.flash",
            "--board",
            "bluefield-3",
        ],
        "refused",
    );
}

#[test]
fn a_packed_and_flashed_image_boots_from_pflash() {
    let d = Dir::new("boot");
    let pk = keygen(&d);
    d.write("dev.toml", &description(&pk));
    let elf = firmware_elf();
    d.ok(&[
        "image",
        "pack",
        elf.to_str().expect("path"),
        "--key",
        "prov.key",
        "-o",
        "fw.img",
    ]);
    d.ok(&["flash", "fw.img", "--to", "dev.flash"]);
    build_bundle(&d, "1", "b1.bundle");
    d.ok(&["flash", "b1.bundle", "--to", "dev.flash"]);
    let flash_path = d.path("dev.flash");
    let mut q = Qemu::start(&[std::ffi::OsStr::new("--flash"), flash_path.as_os_str()]);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .expect("booted from the packed image");
}
