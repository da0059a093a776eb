//! Provisioning fixtures shared by the tests that boot from flash: bundles built with
//! `keelctl provision build` (development keys), flash files made with `keelctl image pack` and
//! `keelctl flash`, and boots from them.

use crate::{BOOT_TIMEOUT, Build, Qemu, free_port, keelctl_ok, root};
use std::path::{Path, PathBuf};

/// The subsystem the test bundles describe.
pub const VOL: &str = "nqn.2026-11.dev.keel:vol0";

/// The development provisioning key (`qemu/dev-keys`), which release images trust.
pub fn dev_key() -> PathBuf {
    root().join("qemu/dev-keys/provision.key")
}

/// The development device key the bundles are sealed for.
pub fn dev_device_key() -> PathBuf {
    root().join("qemu/dev-keys/provision.key.device")
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct Dir(pub PathBuf);

impl Dir {
    /// Creates it (empty) under the scratch directory.
    pub fn new(name: &str) -> Self {
        let p = root().join(format!(
            "target/qemu-tests/scratch/provboot-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        Dir(p)
    }

    /// A file in it.
    pub fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }

    /// A file in it, as a string.
    pub fn p(&self, f: &str) -> String {
        self.path(f).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A description of subsystem VOL with these namespaces: (backend TOML, encryption).
pub fn description(namespaces: &[(&str, &str)]) -> String {
    let mut t =
        format!("[network]\ndhcp = true\n\n[[subsystem]]\nnqn = \"{VOL}\"\nallowed_hosts = []\n");
    for (backend, enc) in namespaces {
        t.push_str(&format!(
            "\n[[namespace]]\nsubsystem = \"{VOL}\"\nbackend = {backend}\nencryption = \"{enc}\"\n"
        ));
    }
    t
}

/// Builds `name` (a bundle of `generation`) from a description, signed with the dev key.
pub fn bundle(d: &Dir, name: &str, generation: u64, namespaces: &[(&str, &str)]) -> PathBuf {
    let toml = d.path(&format!("{name}.toml"));
    std::fs::write(&toml, description(namespaces)).expect("toml");
    build_from(d, &toml, generation, name)
}

/// Builds bundle `name` of `generation` in `d` from the description file `toml`, signed with
/// the development key for the development device key.
pub fn build_from(d: &Dir, toml: &Path, generation: u64, name: &str) -> PathBuf {
    keelctl_ok(&[
        "provision",
        "build",
        toml.to_str().unwrap(),
        "--key",
        dev_key().to_str().unwrap(),
        "--device-key",
        dev_device_key().to_str().unwrap(),
        "--generation",
        &generation.to_string(),
        "-o",
        &d.p(name),
    ]);
    d.path(name)
}

/// A flash file with the release firmware packed into slot A (dev key) and `bundles` flashed
/// into the configuration area in order.
pub fn flash_with(d: &Dir, bundles: &[&Path]) -> PathBuf {
    let elf = crate::image(Build::Release).with_extension("");
    keelctl_ok(&[
        "image",
        "pack",
        elf.to_str().unwrap(),
        "--key",
        dev_key().to_str().unwrap(),
        "-o",
        &d.p("fw.img"),
    ]);
    keelctl_ok(&["flash", &d.p("fw.img"), "--to", &d.p("dev.flash")]);
    for b in bundles {
        keelctl_ok(&["flash", b.to_str().unwrap(), "--to", &d.p("dev.flash")]);
    }
    d.path("dev.flash")
}

/// Boots from a flash file; returns QEMU and the forwarded NVMe/TCP and management addresses.
pub fn boot_flash(flash: &Path, extra: &[&str]) -> (Qemu, String, String) {
    let nport = free_port();
    let mport = free_port();
    let mut args: Vec<String> = vec![
        "--flash".into(),
        flash.display().to_string(),
        "--nvmf-port".into(),
        nport.to_string(),
        "--mgmt-port".into(),
        mport.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut q = Qemu::start(&args);
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (
        q,
        format!("127.0.0.1:{nport}"),
        format!("127.0.0.1:{mport}"),
    )
}
