//! keelctl: the host side of Keel.

use anyhow::Result;
use clap::{Parser, Subcommand};
use keel_host_tools::{console, host, image, mgmt, nvme, provision};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "keelctl", version, about = "Keel host tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make an Ed25519 provisioning key pair (KEY 0600, KEY.pub) and a device key.
    Keygen(provision::KeygenArgs),
    /// Device descriptions and bundles: check, build, verify.
    Provision {
        #[command(subcommand)]
        cmd: provision::ProvisionCmd,
    },
    /// Write a flash image (into a slot) or a bundle (into the configuration area) to a flash
    /// file or device, read back and verify.
    Flash(provision::flash::FlashArgs),
    /// The firmware console: decode its defmt log frames.
    Console {
        #[command(subcommand)]
        cmd: ConsoleCmd,
    },
    /// Firmware images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// NVMe/TCP initiator: discover, identify, read, write, verify, bench.
    Nvme {
        #[command(flatten)]
        target: nvme::cli::TargetArgs,
        #[command(subcommand)]
        cmd: nvme::cli::NvmeCmd,
    },
    /// A running device's state: version, uptime, configuration, namespaces with counters
    /// and latency percentiles, controllers, connections (signed request).
    Status(mgmt::StatusArgs),
    /// Reboot a running device (signed request; it replies first).
    Reboot(mgmt::SignedArgs),
    /// Emulated PCIe functions of a running device: list the slots, create a function on a
    /// free slot, remove one (hot plug, signed requests).
    Function {
        #[command(subcommand)]
        cmd: mgmt::function::FunctionCmd,
    },
    /// Fetch a device's Prometheus metrics (GET /metrics on the management port).
    Metrics(mgmt::MetricsArgs),
    /// Management protocol testing tools.
    #[command(hide = true)]
    Mgmt {
        #[command(subcommand)]
        cmd: mgmt::MgmtCmd,
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
enum ConsoleCmd {
    /// Copy a console (a file, or standard input as it arrives) to standard output with its
    /// defmt log frames decoded; plain text passes through unchanged.
    Decode {
        /// The ELF of the image that produced the console (its .defmt table). Without it,
        /// frames are replaced by a note.
        #[arg(long)]
        elf: Option<PathBuf>,
        /// A captured console (e.g. QEMU's -serial file:...); default: standard input.
        input: Option<PathBuf>,
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
    /// Signed 64 MiB flash image: slot A with the raw image and its header, slot B and the
    /// configuration area empty.
    Pack(image::PackArgs),
    /// Describe a flash image: slots, signatures, configuration copies.
    Info(image::InfoArgs),
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
        Cmd::Nvme { target, cmd } => {
            let code = nvme::cli::run(&target, cmd, &mut std::io::stdout().lock())?;
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
        Cmd::Status(a) => mgmt::status_cmd(&a, &mut std::io::stdout().lock())?,
        Cmd::Reboot(a) => mgmt::reboot_cmd(&a, &mut std::io::stdout().lock())?,
        Cmd::Function { cmd } => mgmt::function::function_cmd(&cmd, &mut std::io::stdout().lock())?,
        Cmd::Metrics(a) => mgmt::metrics_cmd(&a, &mut std::io::stdout().lock())?,
        Cmd::Mgmt { cmd } => {
            let code = mgmt::mgmt_cmd(&cmd, &mut std::io::stdout().lock())?;
            if code != 0 {
                std::process::exit(code);
            }
        }
        Cmd::Console {
            cmd: ConsoleCmd::Decode { elf, input },
        } => {
            let frames = elf
                .as_deref()
                .map(console::FrameDecoder::from_elf_file)
                .transpose()?;
            let mut input: Box<dyn std::io::Read> = match input {
                Some(p) => Box::new(
                    std::fs::File::open(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                ),
                None => Box::new(std::io::stdin().lock()),
            };
            console::decode_stream(frames, &mut input, &mut std::io::stdout().lock())?;
        }
        Cmd::Keygen(a) => provision::keygen_cmd(&a, &mut std::io::stdout().lock())?,
        Cmd::Provision { cmd } => provision::run(&cmd, &mut std::io::stdout().lock())?,
        Cmd::Flash(a) => provision::flash::run(&a, &mut std::io::stdout().lock())?,
        Cmd::Image {
            cmd: ImageCmd::Pack(a),
        } => image::pack_cmd(&a)?,
        Cmd::Image {
            cmd: ImageCmd::Info(a),
        } => {
            let code = image::info_cmd(&a, &mut std::io::stdout().lock())?;
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
