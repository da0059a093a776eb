//! Links the image with the board's linker script, records the git revision and builds the
//! provisioning trust anchor into the image.
//!
//! The provisioning public key comes from the file named by `KEEL_PROVISION_PUBKEY` (the
//! `KEY.pub` that `keelctl keygen` writes: 64 hex digits), by default the public development
//! key `qemu/dev-keys/provision.key.pub`. The firmware trusts bundles signed by that key only.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let linker_dir = root.join("../linker");
    if target_os == "none" {
        // One board today; a board feature would pick its MEMORY file here.
        let board_ld = "qemu-virt.ld";
        println!("cargo:rustc-link-search={}", linker_dir.display());
        println!("cargo:rustc-link-arg=-T{board_ld}");
        // defmt's table of log strings: an INFO section of the ELF, never loaded (the defmt
        // crate puts defmt.x on the link search path).
        println!("cargo:rustc-link-arg=-Tdefmt.x");
        println!(
            "cargo:rerun-if-changed={}",
            linker_dir.join(board_ld).display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            linker_dir.join("image.ld").display()
        );
    }
    trust_anchor(&root);
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let hash = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    println!(
        "cargo:rustc-env=KEEL_GIT_HASH={hash}{}",
        if dirty { "-dirty" } else { "" }
    );
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", root.join(head).display());
    }
}

/// Writes `$OUT_DIR/trust_anchor.rs`: the provisioning public key and whether it is the
/// development key.
fn trust_anchor(root: &std::path::Path) {
    let dev = root.join("../qemu/dev-keys/provision.key.pub");
    println!("cargo:rerun-if-env-changed=KEEL_PROVISION_PUBKEY");
    println!("cargo:rerun-if-changed={}", dev.display());
    let path = std::env::var_os("KEEL_PROVISION_PUBKEY")
        .map(PathBuf::from)
        .unwrap_or_else(|| dev.clone());
    println!("cargo:rerun-if-changed={}", path.display());
    let parse = |p: &std::path::Path| -> Result<[u8; 32], String> {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let t = text.trim();
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{}: not a public key file (64 hex digits, as keelctl keygen writes KEY.pub)",
                p.display()
            ));
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(k)
    };
    let key = parse(&path).unwrap_or_else(|e| panic!("KEEL_PROVISION_PUBKEY: {e}"));
    let is_dev = parse(&dev).is_ok_and(|d| d == key);
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("trust_anchor.rs");
    std::fs::write(
        out,
        format!(
            "/// The provisioning public key built into this image.\n\
             pub const PROVISION_PUBKEY: [u8; 32] = {key:?};\n\
             /// Whether it is the public development key of qemu/dev-keys.\n\
             pub const PROVISION_KEY_IS_DEV: bool = {is_dev};\n"
        ),
    )
    .expect("writing trust_anchor.rs");
}
