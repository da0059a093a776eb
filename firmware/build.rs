//! Links the image with the board's linker script and records the git revision.

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
        println!(
            "cargo:rerun-if-changed={}",
            linker_dir.join(board_ld).display()
        );
        println!(
            "cargo:rerun-if-changed={}",
            linker_dir.join("image.ld").display()
        );
    }
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
