//! `keelctl flash`: writes a packed image's firmware into a slot, or a bundle into the
//! configuration area, of a file or block device holding the flash layout; reads back and
//! verifies.
//!
//! Files and block devices (including `mtdblock`, which erases for us) are written in place.
//! Raw MTD character devices need their sectors erased first (`flash_erase`).

use super::keys::{hex, read_public_key};
use crate::image::{self, BOARDS, DEFAULT_BOARD, SlotContent};
use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use keel_provision::bundle::BUNDLE_MAGIC;
use keel_provision::flash::{self, FLASH_SIZE, Slot};
use keel_provision::image::IMAGE_HEADER_LEN;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// `keelctl flash`.
#[derive(Debug, clap::Args)]
pub struct FlashArgs {
    /// A flash image (keelctl image pack) or a bundle (keelctl provision build).
    pub input: PathBuf,
    /// The flash: a file (created, 64 MiB, when missing or empty) or a block device.
    #[arg(long)]
    pub to: PathBuf,
    /// The firmware slot to write an image into.
    #[arg(long, value_parser = ["a", "b"], default_value = "a")]
    pub slot: String,
    /// The target's board (default: the board of the firmware already in slot A, else qemu-virt).
    #[arg(long)]
    pub board: Option<String>,
    /// Also require the image or bundle to be signed by this public key (KEY.pub).
    #[arg(long = "pub")]
    pub public: Option<PathBuf>,
    /// Write a bundle even when its generation is not newer than the one on the flash.
    #[arg(long)]
    pub force: bool,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    if let Ok(st) =
        ProgressStyle::with_template("{msg:10} {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
    {
        b.set_style(st);
    }
    b.set_message(what.to_string());
    b
}

/// Opens (creating or extending an empty file to an erased 64 MiB) the flash at `path`.
fn open_target(path: &Path) -> Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let size = f.seek(SeekFrom::End(0))?;
    if size == 0 {
        let erased = vec![0xffu8; 1 << 20];
        f.seek(SeekFrom::Start(0))?;
        for _ in 0..FLASH_SIZE >> 20 {
            f.write_all(&erased)?;
        }
    } else {
        ensure!(
            size >= FLASH_SIZE as u64,
            "{} is {size} bytes, smaller than the {} MiB flash layout",
            path.display(),
            FLASH_SIZE >> 20
        );
    }
    Ok(f)
}

/// Writes `data` at `offset` with a progress bar, then reads it back and compares.
fn write_verified(f: &mut File, offset: usize, data: &[u8], label: &str) -> Result<()> {
    const CHUNK: usize = 256 << 10;
    let pb = bar(data.len() as u64, &format!("writing {label}"));
    f.seek(SeekFrom::Start(offset as u64))?;
    for c in data.chunks(CHUNK) {
        f.write_all(c)?;
        pb.inc(c.len() as u64);
    }
    f.sync_all().context("flushing the flash")?;
    pb.finish_and_clear();
    let pb = bar(data.len() as u64, &format!("verifying {label}"));
    f.seek(SeekFrom::Start(offset as u64))?;
    let mut buf = vec![0u8; CHUNK];
    for (i, c) in data.chunks(CHUNK).enumerate() {
        f.read_exact(&mut buf[..c.len()])?;
        if buf[..c.len()] != *c {
            let at = offset + i * CHUNK + buf.iter().zip(c).position(|(a, b)| a != b).unwrap_or(0);
            bail!("read-back mismatch at flash offset {at:#x}: the flash did not take the write");
        }
        pb.inc(c.len() as u64);
    }
    pb.finish_and_clear();
    Ok(())
}

fn read_target(f: &mut File) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; FLASH_SIZE];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut bytes).context("reading the flash")?;
    Ok(bytes)
}

/// Runs `keelctl flash`.
pub fn run(a: &FlashArgs, out: &mut dyn Write) -> Result<()> {
    let input =
        std::fs::read(&a.input).with_context(|| format!("reading {}", a.input.display()))?;
    let trusted = a.public.as_deref().map(read_public_key).transpose()?;
    if input.starts_with(&BUNDLE_MAGIC) {
        ensure!(a.slot == "a", "--slot is for firmware images, not bundles");
        return flash_bundle(a, &input, trusted.as_ref(), out);
    }
    let source = match image::read_slot(&input, Slot::A, trusted.as_ref()) {
        SlotContent::Image {
            header,
            payload,
            check,
        } if input.len() == FLASH_SIZE => {
            check.with_context(|| format!("{}: slot A", a.input.display()))?;
            (header, payload)
        }
        SlotContent::Bad(e) if input.len() == FLASH_SIZE => bail!("{}: {e}", a.input.display()),
        _ => bail!(
            "{} is neither a flash image (keelctl image pack) nor a bundle (keelctl provision build)",
            a.input.display()
        ),
    };
    let (header, payload) = source;
    let mut f = open_target(&a.to)?;
    let current = read_target(&mut f)?;
    let target_board = match (&a.board, image::read_slot(&current, Slot::A, None)) {
        (Some(b), _) => b.clone(),
        (None, SlotContent::Image { header, .. }) => header.board,
        (None, _) => DEFAULT_BOARD.to_string(),
    };
    ensure!(
        header.board == target_board,
        "{} is built for board `{}`, the target is `{target_board}`: refused",
        a.input.display(),
        header.board
    );
    ensure!(
        BOARDS
            .iter()
            .any(|(b, size)| *b == target_board && *size == FLASH_SIZE),
        "board `{target_board}` has no known flash layout"
    );
    let slot = if a.slot == "b" { Slot::B } else { Slot::A };
    let mut region = vec![0xffu8; flash::SLOT_SIZE];
    let off = header.payload_offset as usize;
    region[off..off + payload.len()].copy_from_slice(payload);
    let hb = header.to_bytes().map_err(|e| anyhow::anyhow!("{e}"))?;
    region[flash::SLOT_PAYLOAD_MAX..flash::SLOT_PAYLOAD_MAX + IMAGE_HEADER_LEN]
        .copy_from_slice(&hb);
    write_verified(
        &mut f,
        slot.base(),
        &region,
        &format!("slot {}", slot.name()),
    )?;
    let after = read_target(&mut f)?;
    match image::read_slot(&after, slot, trusted.as_ref()) {
        SlotContent::Image { check: Ok(()), .. } => {}
        _ => bail!("slot {} does not check out after writing", slot.name()),
    }
    writeln!(
        out,
        "{}: slot {} <- Keel {} (build {}) for {}, {} bytes, verified",
        a.to.display(),
        slot.name(),
        header.firmware_version,
        header.build_id,
        header.board,
        payload.len()
    )?;
    if slot == Slot::B {
        writeln!(
            out,
            "note: the firmware boots slot A; slot B is the update slot"
        )?;
    }
    Ok(())
}

fn flash_bundle(
    a: &FlashArgs,
    bundle: &[u8],
    trusted: Option<&keel_provision::ed25519_dalek::VerifyingKey>,
    out: &mut dyn Write,
) -> Result<()> {
    let hdr = match trusted {
        Some(k) => keel_provision::bundle::verify_signature(bundle, k),
        None => keel_provision::inspect(bundle),
    }
    .map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let mut f = open_target(&a.to)?;
    let current = read_target(&mut f)?;
    let (ca, cb) = image::config_regions(&current);
    if let Some((_, e)) = flash::chosen_config(ca, cb)
        && let Ok(h) = keel_provision::inspect(e.payload)
        && h.generation >= hdr.generation
        && !a.force
    {
        bail!(
            "bundle generation {} is not newer than generation {} on the flash: the device would refuse it (--force writes it anyway)",
            hdr.generation,
            h.generation
        );
    }
    let w = flash::next_config_write(ca, cb);
    let mut region =
        flash::encode_config_copy(w.sequence, bundle).map_err(|e| anyhow::anyhow!("{e}"))?;
    region.resize(flash::CONFIG_COPY_SIZE, 0xff);
    write_verified(
        &mut f,
        w.copy.offset(),
        &region,
        &format!("config {}", w.copy.name()),
    )?;
    let after = read_target(&mut f)?;
    let (ca, cb) = image::config_regions(&after);
    ensure!(
        flash::choose_config(ca, cb) == Some(bundle),
        "the configuration in force after writing is not this bundle"
    );
    writeln!(
        out,
        "{}: config {} <- bundle generation {} (sequence {}, {} bytes{}), verified",
        a.to.display(),
        w.copy.name(),
        hdr.generation,
        w.sequence,
        bundle.len(),
        match trusted {
            Some(k) => format!(", signed by {}", hex(k.as_bytes())),
            None => String::new(),
        }
    )?;
    Ok(())
}
