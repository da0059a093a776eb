//! Firmware images: the raw arm64 `Image` (what `-kernel`, U-Boot `booti` and the flash
//! boot path start) made from the firmware ELF, the padded flash file for QEMU's pflash, and
//! the signed flash image of `keelctl image pack` (layout in `keel_provision`'s documentation:
//! the raw image at offset 0 in slot A, its signed header in slot A's last sector).

use anyhow::{Context, Result, bail, ensure};
use keel_provision::ed25519_dalek::{SigningKey, VerifyingKey};
use keel_provision::flash::{self, ConfigCopy, Slot};
use keel_provision::{ImageError, ImageHeader};
use object::{Object, ObjectSegment};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Size of one QEMU `virt` flash bank.
pub const VIRT_FLASH_SIZE: usize = 64 << 20;

/// Offset of the `ARM\x64` magic in the arm64 Image header.
const IMAGE_MAGIC_OFFSET: usize = 56;

/// A raw image and what its header says.
#[derive(Debug, Clone)]
pub struct RawImage {
    /// The bytes, starting with the arm64 Image header.
    pub bytes: Vec<u8>,
    /// The link (load) address of the first byte.
    pub load_address: u64,
    /// The header's text_offset.
    pub text_offset: u64,
    /// The header's image_size: memory the image needs, BSS and stacks included.
    pub memory_size: u64,
}

/// Extracts the loadable segments of a firmware ELF into a flat image.
pub fn raw_from_elf(elf: &[u8]) -> Result<RawImage> {
    let file = object::File::parse(elf).context("not an ELF file")?;
    ensure!(
        file.architecture() == object::Architecture::Aarch64,
        "not an AArch64 ELF"
    );
    let mut segs: Vec<(u64, &[u8])> = Vec::new();
    for seg in file.segments() {
        let data = seg.data().context("reading a segment")?;
        if !data.is_empty() {
            segs.push((seg.address(), data));
        }
    }
    ensure!(!segs.is_empty(), "the ELF has no loadable data");
    segs.sort_by_key(|s| s.0);
    let base = segs[0].0;
    let end = segs
        .iter()
        .map(|(a, d)| a + d.len() as u64)
        .max()
        .unwrap_or(base);
    ensure!(
        end - base < 256 << 20,
        "segments span {} bytes: not a firmware image",
        end - base
    );
    let mut bytes = vec![0u8; (end - base) as usize];
    for (addr, data) in segs {
        let off = (addr - base) as usize;
        bytes[off..off + data.len()].copy_from_slice(data);
    }
    parse_header(bytes, base)
}

/// Checks the arm64 Image header of a raw image.
pub fn parse_header(bytes: Vec<u8>, load_address: u64) -> Result<RawImage> {
    if bytes.len() < 64 || &bytes[IMAGE_MAGIC_OFFSET..IMAGE_MAGIC_OFFSET + 4] != b"ARM\x64" {
        bail!("no arm64 Image header (magic ARM\\x64 at offset 56)");
    }
    let le = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
    let text_offset = le(8);
    let memory_size = le(16);
    Ok(RawImage {
        text_offset,
        memory_size,
        load_address,
        bytes,
    })
}

/// Reads a firmware ELF file and makes its raw image.
pub fn raw_from_elf_file(path: &Path) -> Result<RawImage> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    raw_from_elf(&elf).with_context(|| format!("{}", path.display()))
}

/// Pads a raw image to a flash bank: the image executes in place from address 0 and copies
/// itself to RAM.
pub fn flash_image(raw: &RawImage, bank_size: usize) -> Result<Vec<u8>> {
    ensure!(
        raw.bytes.len() <= bank_size,
        "image ({} bytes) larger than the flash bank",
        raw.bytes.len()
    );
    let mut out = raw.bytes.clone();
    out.resize(bank_size, 0xff);
    Ok(out)
}

/// The boards keelctl knows, with their flash bank size.
pub const BOARDS: &[(&str, usize)] = &[("qemu-virt", VIRT_FLASH_SIZE)];

/// The default board.
pub const DEFAULT_BOARD: &str = "qemu-virt";

/// What goes into an image header besides the payload.
#[derive(Debug, Clone)]
pub struct PackInfo {
    /// Board name.
    pub board: String,
    /// Firmware version.
    pub firmware_version: String,
    /// Build id; `None`: `sha256:` and the first 12 hex digits of the payload's digest.
    pub build_id: Option<String>,
}

/// Makes a signed 64 MiB flash image (layout of `keel_provision::flash`): the raw image at
/// offset 0 (slot A, where a flash boot starts executing), its signed header in slot A's
/// last sector, slot B and both configuration copies erased (0xFF).
pub fn pack(raw: &RawImage, key: &SigningKey, info: &PackInfo) -> Result<Vec<u8>> {
    ensure!(
        raw.bytes.len() <= flash::SLOT_PAYLOAD_MAX,
        "image ({} bytes) larger than a {}-byte firmware slot",
        raw.bytes.len(),
        flash::SLOT_PAYLOAD_MAX
    );
    let mut header = ImageHeader {
        firmware_version: info.firmware_version.clone(),
        build_id: String::new(),
        board: info.board.clone(),
        load_address: raw.load_address,
        payload_offset: 0,
        payload_size: 0,
        memory_size: raw.memory_size,
        sha256: [0; 32],
        signer: [0; 32],
        signature: [0; 64],
    };
    header.set_payload(&raw.bytes);
    header.build_id = match &info.build_id {
        Some(b) => b.clone(),
        None => format!(
            "sha256:{}",
            &crate::provision::keys::hex(&header.sha256)[..12]
        ),
    };
    header
        .sign(key)
        .map_err(|e| anyhow::anyhow!("image header: {e}"))?;
    let mut out = vec![0xff; flash::FLASH_SIZE];
    out[..raw.bytes.len()].copy_from_slice(&raw.bytes);
    let h = Slot::A.header_offset();
    let bytes = header
        .to_bytes()
        .map_err(|e| anyhow::anyhow!("image header: {e}"))?;
    out[h..h + bytes.len()].copy_from_slice(&bytes);
    Ok(out)
}

/// A slot's content as found in a flash image.
#[derive(Debug)]
pub enum SlotContent<'a> {
    /// The header sector is erased.
    Empty,
    /// Something that is not a valid header.
    Bad(ImageError),
    /// A header; `check` says whether its signature and payload hold.
    Image {
        /// The header.
        header: Box<ImageHeader>,
        /// The payload it describes.
        payload: &'a [u8],
        /// Signature and SHA-256 check (against the header's own signer key, or a trusted
        /// key when one was given).
        check: Result<(), ImageError>,
    },
}

/// Reads and checks a slot of a flash image.
pub fn read_slot<'a>(
    flash_bytes: &'a [u8],
    slot: Slot,
    trusted: Option<&VerifyingKey>,
) -> SlotContent<'a> {
    let h = slot.header_offset();
    let Some(hdr) = flash_bytes.get(h..h + keel_provision::image::IMAGE_HEADER_LEN) else {
        return SlotContent::Bad(ImageError::Truncated);
    };
    if hdr.iter().all(|&b| b == 0xff) {
        return SlotContent::Empty;
    }
    let header = match ImageHeader::parse(hdr) {
        Ok(h) => h,
        Err(e) => return SlotContent::Bad(e),
    };
    let start = slot.base() as u64 + header.payload_offset;
    let end = start.saturating_add(header.payload_size);
    if header.payload_offset + header.payload_size > flash::SLOT_PAYLOAD_MAX as u64 {
        return SlotContent::Bad(ImageError::Malformed("payload larger than its slot"));
    }
    let payload = &flash_bytes[start as usize..end as usize];
    let check = header.verify(payload, trusted);
    SlotContent::Image {
        header: Box::new(header),
        payload,
        check,
    }
}

/// The two configuration copies' regions of a flash image.
pub fn config_regions(flash_bytes: &[u8]) -> (&[u8], &[u8]) {
    let region = |c: ConfigCopy| &flash_bytes[c.offset()..c.offset() + flash::CONFIG_COPY_SIZE];
    (region(ConfigCopy::A), region(ConfigCopy::B))
}

/// Describes a flash image: slots, configuration copies, the configuration in force.
pub fn describe(
    flash_bytes: &[u8],
    trusted: Option<&VerifyingKey>,
    out: &mut dyn Write,
) -> Result<bool> {
    ensure!(
        flash_bytes.len() >= flash::FLASH_SIZE,
        "{} bytes: smaller than the {} MiB flash layout",
        flash_bytes.len(),
        flash::FLASH_SIZE >> 20
    );
    let hex = crate::provision::keys::hex;
    let mut all_ok = true;
    for slot in [Slot::A, Slot::B] {
        write!(out, "slot {} at {:#09x}: ", slot.name(), slot.base())?;
        match read_slot(flash_bytes, slot, trusted) {
            SlotContent::Empty => writeln!(out, "empty")?,
            SlotContent::Bad(e) => {
                all_ok = false;
                writeln!(out, "invalid header at {:#09x}: {e}", slot.header_offset())?;
            }
            SlotContent::Image {
                header: h, check, ..
            } => {
                writeln!(
                    out,
                    "Keel {} (build {}) for {}",
                    h.firmware_version, h.build_id, h.board
                )?;
                writeln!(
                    out,
                    "  payload {} bytes at +{:#x}, load address {:#x}, needs {} KiB of RAM",
                    h.payload_size,
                    h.payload_offset,
                    h.load_address,
                    h.memory_size >> 10
                )?;
                writeln!(out, "  sha256 {}", hex(&h.sha256))?;
                writeln!(out, "  signer {}", hex(&h.signer))?;
                match check {
                    Ok(()) if trusted.is_some() => {
                        writeln!(out, "  signature: valid, trusted key; payload: intact")?
                    }
                    Ok(()) => writeln!(
                        out,
                        "  signature: valid (signer key not checked: --pub KEY.pub); payload: intact"
                    )?,
                    Err(e) => {
                        all_ok = false;
                        writeln!(out, "  check FAILED: {e}")?;
                    }
                }
            }
        }
    }
    let (a, b) = config_regions(flash_bytes);
    for (copy, region) in [(ConfigCopy::A, a), (ConfigCopy::B, b)] {
        write!(out, "config {} at {:#09x}: ", copy.name(), copy.offset())?;
        match flash::parse_config_copy(region) {
            None if region[..flash::CONFIG_HEADER_LEN]
                .iter()
                .all(|&x| x == 0xff) =>
            {
                writeln!(out, "empty")?
            }
            None => writeln!(out, "invalid (torn or corrupt)")?,
            Some(e) => match keel_provision::inspect(e.payload) {
                Ok(h) => writeln!(
                    out,
                    "sequence {}, bundle generation {} ({} bytes)",
                    e.sequence,
                    h.generation,
                    e.payload.len()
                )?,
                Err(err) => writeln!(
                    out,
                    "sequence {}, {} bytes, not a bundle: {err}",
                    e.sequence,
                    e.payload.len()
                )?,
            },
        }
    }
    match flash::chosen_config(a, b) {
        Some((copy, e)) => writeln!(
            out,
            "configuration in force: copy {} (sequence {})",
            copy.name(),
            e.sequence
        )?,
        None => writeln!(
            out,
            "configuration in force: none (the firmware uses its defaults)"
        )?,
    }
    Ok(all_ok)
}

/// `keelctl image pack`.
#[derive(Debug, clap::Args)]
pub struct PackArgs {
    /// The firmware ELF.
    pub elf: PathBuf,
    /// The signing key (from keelctl keygen).
    #[arg(long)]
    pub key: PathBuf,
    /// Output file: a 64 MiB flash image.
    #[arg(short, long)]
    pub output: PathBuf,
    /// The board the image is for.
    #[arg(long, default_value = DEFAULT_BOARD)]
    pub board: String,
    /// Firmware version recorded in the header.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub fw_version: String,
    /// Build id recorded in the header (default: from the payload's SHA-256).
    #[arg(long)]
    pub build_id: Option<String>,
}

/// `keelctl image info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// A flash image (file or device).
    pub image: PathBuf,
    /// Check that the slots are signed by this public key (KEY.pub).
    #[arg(long = "pub")]
    pub public: Option<PathBuf>,
}

/// Runs `keelctl image pack`.
pub fn pack_cmd(a: &PackArgs) -> Result<()> {
    if !BOARDS.iter().any(|(b, _)| *b == a.board) {
        eprintln!(
            "keelctl: warning: board `{}` is not one keelctl knows ({}); using the qemu-virt layout",
            a.board,
            BOARDS.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
        );
    }
    let raw = raw_from_elf_file(&a.elf)?;
    let key = crate::provision::keys::read_signing_key(&a.key)?;
    let info = PackInfo {
        board: a.board.clone(),
        firmware_version: a.fw_version.clone(),
        build_id: a.build_id.clone(),
    };
    let out = pack(&raw, &key, &info)?;
    std::fs::write(&a.output, &out).with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "{}: {} MiB flash image, slot A: {} bytes for {}, load address {:#x}, signed by {}",
        a.output.display(),
        out.len() >> 20,
        raw.bytes.len(),
        a.board,
        raw.load_address,
        crate::provision::keys::hex(key.verifying_key().as_bytes())
    );
    Ok(())
}

/// Runs `keelctl image info`: 0 when every slot present checks out, 1 otherwise.
pub fn info_cmd(a: &InfoArgs, out: &mut dyn Write) -> Result<i32> {
    let trusted = a
        .public
        .as_deref()
        .map(crate::provision::keys::read_public_key)
        .transpose()?;
    let bytes = read_flash(&a.image)?;
    writeln!(out, "{}: {} bytes", a.image.display(), bytes.len())?;
    Ok(if describe(&bytes, trusted.as_ref(), out)? {
        0
    } else {
        1
    })
}

/// Reads the flash layout's bytes from a file or block device.
pub fn read_flash(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::with_capacity(flash::FLASH_SIZE);
    (&mut f)
        .take(flash::FLASH_SIZE as u64)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_firmware() {
        assert!(raw_from_elf(b"not an elf").is_err());
        assert!(parse_header(vec![0; 64], 0).is_err());
    }

    #[test]
    fn reads_the_arm64_header() {
        let mut b = vec![0u8; 128];
        b[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
        b[16..24].copy_from_slice(&0x9_0000u64.to_le_bytes());
        b[56..60].copy_from_slice(b"ARM\x64");
        let img = parse_header(b, 0x4020_0000).unwrap();
        assert_eq!(img.text_offset, 0x20_0000);
        assert_eq!(img.memory_size, 0x9_0000);
        let flash = flash_image(&img, 4096).unwrap();
        assert_eq!(flash.len(), 4096);
        assert_eq!(flash[200], 0xff);
        assert!(flash_image(&img, 64).is_err());
    }

    #[test]
    fn pack_places_the_raw_image_at_0_and_a_signed_header_at_the_end_of_slot_a() {
        let mut b = vec![0x5au8; 4096];
        b[56..60].copy_from_slice(b"ARM\x64");
        let raw = parse_header(b, 0x4020_0000).unwrap();
        let key = SigningKey::from_bytes(&[4; 32]);
        let info = PackInfo {
            board: DEFAULT_BOARD.into(),
            firmware_version: "0.1.0".into(),
            build_id: None,
        };
        let mut img = pack(&raw, &key, &info).unwrap();
        assert_eq!(img.len(), flash::FLASH_SIZE);
        assert_eq!(img[..4096], raw.bytes[..]);
        assert_eq!(img[4096], 0xff);
        match read_slot(&img, Slot::A, Some(&key.verifying_key())) {
            SlotContent::Image { header, check, .. } => {
                check.unwrap();
                assert_eq!(header.board, "qemu-virt");
                assert!(header.build_id.starts_with("sha256:"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_slot(&img, Slot::B, None), SlotContent::Empty));
        let mut out = Vec::new();
        assert!(describe(&img, None, &mut out).unwrap());
        img[100] ^= 1;
        match read_slot(&img, Slot::A, None) {
            SlotContent::Image { check, .. } => assert_eq!(check, Err(ImageError::PayloadHash)),
            other => panic!("{other:?}"),
        }
        assert!(!describe(&img, None, &mut Vec::new()).unwrap());
        let too_big = RawImage {
            bytes: vec![0; flash::SLOT_PAYLOAD_MAX + 1],
            ..raw
        };
        assert!(pack(&too_big, &key, &info).is_err());
    }
}
