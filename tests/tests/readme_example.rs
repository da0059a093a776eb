//! The device description README.md shows is the file `qemu/examples/device.toml`, and that
//! file boots: `qemu/run --config qemu/examples/device.toml` serves its two namespaces (one
//! AES-XTS encrypted) over NVMe/TCP and reports them through the management endpoint with the
//! development key named in the file.

use keel_tests::{
    BOOT_TIMEOUT, Build, Qemu, build_release_keelctl, free_port, keelctl_ok, namespaces_in_status,
    root,
};

const EXAMPLE: &str = "qemu/examples/device.toml";
const VOL: &str = "nqn.2026-11.dev.keel:vol0";

/// The first ```toml block of README's provisioning section.
fn readme_toml() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = &readme[readme
        .find("## Provisioning")
        .expect("README has a Provisioning section")..];
    let start = section.find("```toml\n").expect("a ```toml block") + "```toml\n".len();
    let len = section[start..].find("```").expect("end of the block");
    section[start..start + len].to_string()
}

#[test]
fn readme_shows_the_example_file() {
    let file = std::fs::read_to_string(root().join(EXAMPLE)).expect("example");
    assert_eq!(
        readme_toml(),
        file,
        "README's device description must be {EXAMPLE}, which the next test boots"
    );
    let out = keelctl_ok(&[
        "provision",
        "check",
        &root().join(EXAMPLE).display().to_string(),
    ]);
    assert!(
        out.contains("1 subsystem(s), 2 namespace(s) (1 encrypted)"),
        "{out}"
    );
}

#[test]
fn the_example_boots_and_serves_its_namespaces() {
    build_release_keelctl();
    let elf = keel_tests::image(Build::Release).with_extension("");
    let nport = free_port();
    let mport = free_port();
    let mut q = Qemu::start(&[
        "--elf".to_string(),
        elf.display().to_string(),
        "--config".to_string(),
        root().join(EXAMPLE).display().to_string(),
        "--nvmf-port".to_string(),
        nport.to_string(),
        "--mgmt-port".to_string(),
        mport.to_string(),
    ]);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let console = q.console();
    assert!(console.contains("in force"), "{console}");

    let addr = format!("127.0.0.1:{nport}");
    let ident = keelctl_ok(&["nvme", "identify", "--addr", &addr, "--nqn", VOL]);
    assert!(ident.contains("Keel example volume"), "{ident}");
    for nsid in ["1", "2"] {
        keelctl_ok(&[
            "nvme", "verify", "--addr", &addr, "--nqn", VOL, "--nsid", nsid, "--lba", "0",
            "--count", "64",
        ]);
    }

    let key = root().join("qemu/dev-keys/provision.key");
    let dev = format!("127.0.0.1:{mport}");
    let status = keelctl_ok(&[
        "status",
        "--device",
        &dev,
        "--key",
        &key.display().to_string(),
        "--json",
    ]);
    assert_eq!(namespaces_in_status(&status), 2, "{status}");
    assert!(
        status.contains("\"encryption\": \"aes-256-xts\""),
        "{status}"
    );
    assert!(
        status.contains("\"config_source\": \"flash copy"),
        "{status}"
    );
    // Each namespace saw the 64 blocks written by verify.
    assert!(!status.contains("\"writes\": 0,"), "{status}");
}
