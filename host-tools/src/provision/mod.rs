//! Provisioning from the host: key files, `keelctl keygen`, `keelctl provision check|build|
//! verify`, `keelctl flash`. The formats live in the portable crate `keel_provision`
//! (re-exported here), which the firmware shares.

pub mod flash;
pub mod keys;

pub use keel_provision;

use anyhow::{Context, Result};
use keel_provision::Device;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `keelctl keygen`.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The signing key file to write (mode 0600); its public key goes to KEY.pub.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Where to write a new device key (mode 0600); default KEY.device.
    #[arg(long)]
    pub device_key: Option<PathBuf>,
    /// Make no device key.
    #[arg(long, conflicts_with = "device_key")]
    pub no_device_key: bool,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

/// `keelctl provision`.
#[derive(Debug, clap::Subcommand)]
pub enum ProvisionCmd {
    /// Check a TOML device description (errors name the line and the field).
    Check {
        /// The description.
        file: PathBuf,
    },
    /// Build a signed bundle from a TOML device description.
    Build {
        /// The description.
        file: PathBuf,
        /// The signing key (keelctl keygen).
        #[arg(long)]
        key: PathBuf,
        /// The device's key, under which the namespace data keys are wrapped.
        #[arg(long)]
        device_key: PathBuf,
        /// Generation number (default: the current time in seconds, so it only increases).
        #[arg(long)]
        generation: Option<u64>,
        /// Keep the data keys of the previous bundle (the one the device runs) for encrypted
        /// namespaces it already has with the same subsystem, NSID and cipher; without it every
        /// build draws new keys, and the device reads such a namespace's old data as noise
        /// after its next boot (a crypto-erase).
        #[arg(long, value_name = "PREVIOUS_BUNDLE")]
        keep_keys_from: Option<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Verify and open a bundle as the device would, and summarise it.
    Verify {
        /// The bundle.
        bundle: PathBuf,
        /// The trusted public key (KEY.pub).
        #[arg(long = "pub")]
        public: PathBuf,
        /// The device key.
        #[arg(long)]
        device_key: PathBuf,
        /// The generation in force on the device (bundles not above it are refused).
        #[arg(long, default_value_t = 0)]
        current_generation: u64,
    },
    /// Write a device identity: a flash bank image (QEMU `virt` pflash bank 1, 64 MiB)
    /// starting with the identity block that holds the device key. On QEMU, `qemu/run
    /// --identity FILE` attaches it; a real device keeps its key in OTP or a secure element.
    Identity {
        /// The device key (keelctl keygen writes KEY.device).
        #[arg(long)]
        device_key: PathBuf,
        /// Output file (64 MiB, erased flash with the identity block at offset 0).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Push a signed bundle to a running device over its management endpoint; prints what
    /// the device applied (exit 1 with the device's message when it refuses).
    Push(crate::mgmt::PushArgs),
}

/// `KEY.device` beside `KEY`.
fn default_device_key_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".device");
    PathBuf::from(p)
}

/// Runs `keelctl keygen`.
pub fn keygen_cmd(a: &KeygenArgs, out: &mut dyn Write) -> Result<()> {
    let dk = if a.no_device_key {
        None
    } else {
        Some(
            a.device_key
                .clone()
                .unwrap_or_else(|| default_device_key_path(&a.output)),
        )
    };
    let g = keys::keygen(&a.output, dk.as_deref(), a.force)?;
    writeln!(out, "signing key: {} (keep it secret)", g.key.display())?;
    writeln!(
        out,
        "public key:  {} ({})",
        g.public_file.display(),
        keys::hex(g.public.as_bytes())
    )?;
    if let Some(d) = g.device_key {
        writeln!(
            out,
            "device key:  {} (one per device; keep it secret)",
            d.display()
        )?;
    }
    Ok(())
}

/// Reads and checks a TOML description; errors start with the file name and the line.
pub fn load_description(path: &Path) -> Result<Device> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    keel_provision::parse_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn summary(d: &Device) -> String {
    let enc = d
        .namespaces
        .iter()
        .filter(|n| n.encryption != keel_provision::Encryption::None)
        .count();
    let remote = d
        .namespaces
        .iter()
        .filter(|n| matches!(n.backend, keel_provision::Backend::Remote { .. }))
        .count();
    let remote = match remote {
        0 => String::new(),
        n => format!(", {n} remote"),
    };
    format!(
        "{} subsystem(s), {} namespace(s) ({enc} encrypted{remote}), network {}, management {}",
        d.subsystems.len(),
        d.namespaces.len(),
        match d.network {
            keel_provision::Network::Dhcp => "DHCP".to_string(),
            keel_provision::Network::Static {
                address: [a, b, c, e],
                prefix_len,
                ..
            } => format!("{a}.{b}.{c}.{e}/{prefix_len}"),
        },
        match &d.management {
            Some(m) => format!("port {}", m.port),
            None => "off".into(),
        }
    )
}

/// The default generation: seconds since the Unix epoch.
pub fn default_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs())
}

/// Data keys for `new`: the key of the same encrypted namespace (subsystem, NSID, cipher) in
/// `old`, else a fresh one. Returns them and how many were kept.
pub fn carried_keys(
    new: &Device,
    old: &keel_provision::Config,
    rng: &mut dyn FnMut(&mut [u8]),
) -> (Vec<Option<keel_provision::DataKey>>, usize) {
    let mut kept = 0;
    let keys = new
        .namespaces
        .iter()
        .map(|n| {
            let len = n.encryption.key_len();
            if len == 0 {
                return None;
            }
            let same = old
                .device
                .namespaces
                .iter()
                .zip(&old.keys)
                .find(|(o, _)| {
                    o.subsystem == n.subsystem && o.nsid == n.nsid && o.encryption == n.encryption
                })
                .and_then(|(_, k)| k.clone());
            match same {
                Some(k) => {
                    kept += 1;
                    Some(k)
                }
                None => {
                    let mut b = vec![0u8; len];
                    rng(&mut b);
                    Some(keel_provision::DataKey::from_bytes(b))
                }
            }
        })
        .collect();
    (keys, kept)
}

/// A 64 MiB flash bank image (erased: 0xFF) holding the identity block of `key` at offset 0.
pub fn identity_image(key: &keel_provision::DeviceKey) -> Vec<u8> {
    let mut image = vec![0xffu8; keel_provision::flash::FLASH_SIZE];
    let block = keel_provision::encode_identity(key);
    image[..block.len()].copy_from_slice(&block);
    image
}

/// Runs `keelctl provision`.
pub fn run(cmd: &ProvisionCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        ProvisionCmd::Check { file } => {
            let d = load_description(file)?;
            writeln!(out, "{}: ok: {}", file.display(), summary(&d))?;
        }
        ProvisionCmd::Build {
            file,
            key,
            device_key,
            generation,
            keep_keys_from,
            output,
        } => {
            let mut d = load_description(file)?;
            let signing = keys::read_signing_key(key)?;
            let dk = keys::read_device_key(device_key)?;
            let generation = generation.unwrap_or_else(default_generation);
            let bytes = match keep_keys_from {
                None => {
                    keel_provision::assign_nguids(&mut d, None, &mut keys::os_random);
                    keel_provision::build(&d, generation, &signing, &dk, &mut keys::os_random)
                }
                Some(prev) => {
                    let old = std::fs::read(prev)
                        .with_context(|| format!("reading {}", prev.display()))?;
                    let old =
                        keel_provision::verify_and_open(&old, &signing.verifying_key(), &dk, 0)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", prev.display()))?;
                    keel_provision::assign_nguids(&mut d, Some(&old.device), &mut keys::os_random);
                    let (data_keys, kept) = carried_keys(&d, &old, &mut keys::os_random);
                    writeln!(out, "data keys kept from {}: {kept}", prev.display())?;
                    keel_provision::build_with_keys(
                        &d,
                        generation,
                        &signing,
                        &dk,
                        &data_keys,
                        &mut keys::os_random,
                    )
                }
            }
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            std::fs::write(output, &bytes)
                .with_context(|| format!("writing {}", output.display()))?;
            writeln!(
                out,
                "{}: bundle generation {generation}, {} bytes: {}",
                output.display(),
                bytes.len(),
                summary(&d)
            )?;
        }
        ProvisionCmd::Verify {
            bundle,
            public,
            device_key,
            current_generation,
        } => {
            let bytes =
                std::fs::read(bundle).with_context(|| format!("reading {}", bundle.display()))?;
            let pk = keys::read_public_key(public)?;
            let dk = keys::read_device_key(device_key)?;
            let c = keel_provision::verify_and_open(&bytes, &pk, &dk, *current_generation)
                .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
            writeln!(
                out,
                "{}: valid, generation {}: {}",
                bundle.display(),
                c.generation,
                summary(&c.device)
            )?;
        }
        ProvisionCmd::Identity { device_key, output } => {
            let dk = keys::read_device_key(device_key)?;
            let image = identity_image(&dk);
            std::fs::write(output, &image)
                .with_context(|| format!("writing {}", output.display()))?;
            writeln!(
                out,
                "{}: identity block (device key from {}), {} MiB flash bank image",
                output.display(),
                device_key.display(),
                image.len() >> 20
            )?;
        }
        ProvisionCmd::Push(a) => crate::mgmt::push_cmd(a, out)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::keys;

    #[test]
    fn rebuilt_bundles_keep_the_data_keys_of_unchanged_namespaces() {
        use keel_provision::ed25519_dalek::SigningKey;
        let ns = |nsid: u32, enc: &str| {
            format!(
                "\n[[namespace]]\nsubsystem = \"nqn.2026-11.dev.keel:v\"\nnsid = {nsid}\n\
                 backend = {{ ram = \"1MiB\" }}\nencryption = \"{enc}\"\n"
            )
        };
        let head = "[network]\ndhcp = true\n[[subsystem]]\nnqn = \"nqn.2026-11.dev.keel:v\"\n";
        let old = keel_provision::parse_toml(&format!(
            "{head}{}{}",
            ns(1, "aes-256-xts"),
            ns(2, "aes-128-xts")
        ))
        .unwrap();
        let new = keel_provision::parse_toml(&format!(
            "{head}{}{}{}",
            ns(1, "aes-256-xts"),
            ns(2, "aes-256-xts"),
            ns(3, "none")
        ))
        .unwrap();
        let sk = SigningKey::from_bytes(&[3; 32]);
        let dk = keel_provision::DeviceKey::from_bytes([4; 32]);
        let mut rng = |b: &mut [u8]| keys::os_random(b);
        let old_bundle = keel_provision::build(&old, 1, &sk, &dk, &mut rng).unwrap();
        let old_cfg =
            keel_provision::verify_and_open(&old_bundle, &sk.verifying_key(), &dk, 0).unwrap();
        let (k, kept) = super::carried_keys(&new, &old_cfg, &mut rng);
        assert_eq!(kept, 1);
        assert_eq!(
            k[0], old_cfg.keys[0],
            "same namespace, same cipher: same key"
        );
        assert_eq!(
            k[1].as_ref().map(|k| k.len()),
            Some(64),
            "cipher changed: new key"
        );
        assert!(k[2].is_none());
        let b = keel_provision::build_with_keys(&new, 2, &sk, &dk, &k, &mut rng).unwrap();
        let c = keel_provision::verify_and_open(&b, &sk.verifying_key(), &dk, 1).unwrap();
        assert_eq!(c.keys[0], old_cfg.keys[0]);
    }

    #[test]
    fn identity_image_holds_the_device_key_at_offset_0() {
        let key = keel_provision::DeviceKey::from_bytes([0x5a; 32]);
        let image = super::identity_image(&key);
        assert_eq!(image.len(), 64 << 20);
        let back = keel_provision::parse_identity(&image).unwrap();
        assert_eq!(back.expose_secret(), &[0x5a; 32]);
        assert!(image[64..].iter().all(|&b| b == 0xff));
    }
}
