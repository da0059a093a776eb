//! Key files.
//!
//! All are one line of text:
//! - `KEY`: `keel-signing-key <64 hex digits>` (the Ed25519 seed), mode 0600;
//! - `KEY.pub`: `<64 hex digits>` (the Ed25519 public key: paste it as
//!   `[management] authorized_key`), mode 0644;
//! - device key: `keel-device-key <64 hex digits>`, mode 0600.
//!
//! The tags keep one kind of key from being used as another. Secret files are created with
//! mode 0600 from the start (no window with wider permissions) and never overwritten unless
//! asked.

use anyhow::{Context, Result, bail};
use keel_provision::DeviceKey;
use keel_provision::ed25519_dalek::{SigningKey, VerifyingKey};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const SIGNING_TAG: &str = "keel-signing-key";
const DEVICE_TAG: &str = "keel-device-key";

/// Fills `buf` from the operating system's generator.
pub fn os_random(buf: &mut [u8]) {
    // A host without a working OS generator cannot make keys at all: stop rather than go on.
    if let Err(e) = getrandom::fill(buf) {
        panic!("the operating system's random generator failed: {e}");
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes exactly 32 bytes of hex.
pub fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn write_new(path: &Path, text: &str, mode: u32, force: bool) -> Result<()> {
    if force && path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            if path.exists() {
                format!("{} exists (--force replaces it)", path.display())
            } else {
                format!("creating {}", path.display())
            }
        })?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// `KEY.pub` beside `KEY`.
pub fn public_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// What `keelctl keygen` wrote.
#[derive(Debug)]
pub struct Generated {
    /// The public key.
    pub public: VerifyingKey,
    /// Where the secret key went.
    pub key: PathBuf,
    /// Where the public key went.
    pub public_file: PathBuf,
    /// Where the device key went, if one was made.
    pub device_key: Option<PathBuf>,
}

/// Makes an Ed25519 key pair (`key`, `key.pub`) and, when `device_key` is given, a device key.
pub fn keygen(key: &Path, device_key: Option<&Path>, force: bool) -> Result<Generated> {
    let pubfile = public_path(key);
    for p in [Some(key), Some(pubfile.as_path()), device_key]
        .into_iter()
        .flatten()
    {
        if !force && p.exists() {
            bail!("{} exists (--force replaces it)", p.display());
        }
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    os_random(&mut *seed);
    let signing = SigningKey::from_bytes(&seed);
    let text = Zeroizing::new(format!("{SIGNING_TAG} {}\n", hex(&*seed)));
    write_new(key, &text, 0o600, force)?;
    write_new(
        &pubfile,
        &format!("{}\n", hex(signing.verifying_key().as_bytes())),
        0o644,
        force,
    )?;
    if let Some(dk) = device_key {
        let mut k = Zeroizing::new([0u8; 32]);
        os_random(&mut *k);
        let text = Zeroizing::new(format!("{DEVICE_TAG} {}\n", hex(&*k)));
        write_new(dk, &text, 0o600, force)?;
    }
    Ok(Generated {
        public: signing.verifying_key(),
        key: key.to_path_buf(),
        public_file: pubfile,
        device_key: device_key.map(Path::to_path_buf),
    })
}

fn read_tagged(path: &Path, tag: &str, what: &str) -> Result<Zeroizing<[u8; 32]>> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let rest = text
        .trim()
        .strip_prefix(tag)
        .with_context(|| format!("{} is not a {what} (no `{tag}` line)", path.display()))?;
    unhex32(rest)
        .map(Zeroizing::new)
        .with_context(|| format!("{}: the {what} is not 64 hex digits", path.display()))
}

/// Reads a signing key file.
pub fn read_signing_key(path: &Path) -> Result<SigningKey> {
    let seed = read_tagged(path, SIGNING_TAG, "signing key")?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a device key file.
pub fn read_device_key(path: &Path) -> Result<DeviceKey> {
    Ok(DeviceKey::from_bytes(*read_tagged(
        path,
        DEVICE_TAG,
        "device key",
    )?))
}

/// Reads a public key file (`KEY.pub`); given the secret key file by mistake, says so.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if text.starts_with(SIGNING_TAG) || text.starts_with(DEVICE_TAG) {
        bail!(
            "{} is a secret key file; give the .pub file",
            path.display()
        );
    }
    let bytes = unhex32(&text).with_context(|| format!("{}: not 64 hex digits", path.display()))?;
    VerifyingKey::from_bytes(&bytes)
        .with_context(|| format!("{}: not an Ed25519 public key", path.display()))
}
