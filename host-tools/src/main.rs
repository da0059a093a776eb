//! keelctl: the host side of Keel.

use anyhow::Result;
use clap::{Parser, Subcommand};
use keel_host_tools::{host, image, nvme};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "keelctl", version, about = "Keel host tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Firmware images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// NVMe/TCP initiator: discover, identify, read, write, verify, bench.
    Nvme {
        #[command(subcommand)]
        cmd: nvme::cli::NvmeCmd,
    },
    /// Emulated NVMe PCIe function from the server's side: --window FILE identify, read,
    /// write, verify, bench, nbd (NBD export), emulate (in-process function).
    Host {
        #[command(flatten)]
        window: host::cli::WindowArgs,
        #[command(subcommand)]
        cmd: host::cli::HostCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Raw arm64 Image from the firmware ELF (what -kernel and U-Boot booti start).
    Raw {
        /// The firmware ELF.
        elf: PathBuf,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Pad to a QEMU virt flash bank (64 MiB) to boot from pflash.
        #[arg(long)]
        flash: bool,
    },
}

fn main() {
    if let Err(e) = run() {
        eprintln!("keelctl: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Nvme { cmd } => {
            let code = nvme::cli::run(cmd, &mut std::io::stdout().lock())?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Host { window, cmd } => {
            let code = host::cli::run(&window, cmd, &mut std::io::stdout().lock())?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Image {
            cmd: ImageCmd::Raw { elf, output, flash },
        } => {
            let raw = image::raw_from_elf_file(&elf)?;
            let bytes = if flash {
                image::flash_image(&raw, image::VIRT_FLASH_SIZE)?
            } else {
                raw.bytes.clone()
            };
            std::fs::write(&output, &bytes)?;
            eprintln!(
                "{}: {} bytes, load address {:#x}, needs {} KiB of RAM",
                output.display(),
                raw.bytes.len(),
                raw.load_address,
                raw.memory_size >> 10
            );
        }
    }
    Ok(())
}
