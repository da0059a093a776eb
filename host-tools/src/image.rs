//! Firmware images: the raw arm64 `Image` (what `-kernel`, U-Boot `booti` and the flash
//! boot path start) made from the firmware ELF, and the padded flash file for QEMU's pflash.

use anyhow::{Context, Result, bail, ensure};
use object::{Object, ObjectSegment};
use std::path::Path;

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
}
