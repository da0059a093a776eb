//! The firmware console: plain text with defmt log frames in between, turned into text.
//!
//! The firmware (`keel-hal`'s console) writes its log records as defmt frames: `0xFF`, the
//! frame in rzCOBS (no `0x00` inside), `0x00`. Text never holds either byte, so [`Splitter`]
//! separates the two without knowing anything else; [`FrameDecoder`] turns a frame back into a
//! line with the `.defmt` table of the image's ELF (`defmt-decoder`), and [`ConsoleDecoder`]
//! does both for a whole console stream: text passes through unchanged, each frame becomes
//!
//! ```text
//! [    0.051733] INFO  identity: flash bank 1 holds no identity block: no device key
//! ```
//!
//! Frames decoded with the table of another build come out wrong or as `malformed`: decode
//! with the ELF of the image that ran.

use anyhow::{Context, Result};
use defmt_decoder::{DecodeError, Table};
use std::io::{Read, Write};
use std::path::Path;

/// The byte that opens a frame (`keel_hal::console::FRAME_START`).
pub const FRAME_START: u8 = 0xFF;
/// The byte that ends a frame (`keel_hal::console::FRAME_END`, rzCOBS's delimiter).
pub const FRAME_END: u8 = 0x00;
/// A frame longer than this is not one (a lost end byte): it is dropped.
const MAX_FRAME: usize = 64 * 1024;

/// One piece of the console stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Plain text, as it came.
    Text(&'a [u8]),
    /// A whole frame: its rzCOBS bytes, without the start and end bytes.
    Frame(Vec<u8>),
}

/// Separates text from frames in a console byte stream fed in pieces of any size.
#[derive(Debug, Default)]
pub struct Splitter {
    /// `Some` while inside a frame: its bytes so far.
    frame: Option<Vec<u8>>,
}

impl Splitter {
    /// Feeds `bytes`, calling `out` with each piece found, in order.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut dyn FnMut(Piece<'_>)) {
        while !bytes.is_empty() {
            match self.frame.as_mut() {
                None => {
                    let n = bytes
                        .iter()
                        .position(|&b| b == FRAME_START)
                        .unwrap_or(bytes.len());
                    // A stray end byte (a frame cut short by a crash report) is not text.
                    let text = &bytes[..n];
                    for part in text.split(|&b| b == FRAME_END).filter(|p| !p.is_empty()) {
                        out(Piece::Text(part));
                    }
                    if n < bytes.len() {
                        self.frame = Some(Vec::new());
                        bytes = &bytes[n + 1..];
                    } else {
                        bytes = &[];
                    }
                }
                Some(frame) => {
                    match bytes.iter().position(|&b| b == FRAME_END) {
                        Some(n) => {
                            frame.extend_from_slice(&bytes[..n]);
                            let f = self.frame.take().unwrap_or_default();
                            if !f.is_empty() {
                                out(Piece::Frame(f));
                            }
                            bytes = &bytes[n + 1..];
                        }
                        None => {
                            frame.extend_from_slice(bytes);
                            bytes = &[];
                        }
                    }
                    if self.frame.as_ref().is_some_and(|f| f.len() > MAX_FRAME) {
                        self.frame = None;
                    }
                }
            }
        }
    }
}

/// Decodes frames with the `.defmt` table of a firmware ELF.
#[derive(Debug)]
pub struct FrameDecoder {
    table: Table,
}

impl FrameDecoder {
    /// The decoder for the firmware ELF at `path`.
    pub fn from_elf_file(path: &Path) -> Result<Self> {
        let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_elf(&elf).with_context(|| format!("{}", path.display()))
    }

    /// The decoder for a firmware ELF's bytes.
    pub fn from_elf(elf: &[u8]) -> Result<Self> {
        let table = Table::parse(elf)
            .context("reading the .defmt table")?
            .context("no .defmt table in this ELF (not a Keel firmware image?)")?;
        Ok(Self { table })
    }

    /// The table (for tests that encode frames against it).
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// One frame (rzCOBS bytes without start and end) as a console line, with its newline:
    /// `[    0.051733] INFO  message`.
    pub fn line(&self, frame: &[u8]) -> String {
        let mut stream = self.table.new_stream_decoder();
        stream.received(frame);
        stream.received(&[FRAME_END]);
        match stream.decode() {
            Ok(f) => {
                let ts = f
                    .display_timestamp()
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                let level = f
                    .level()
                    .map(|l| l.as_str().to_ascii_uppercase())
                    .unwrap_or_default();
                format!("[{ts:>12}] {level:<5} {}\n", f.display_message())
            }
            Err(DecodeError::UnexpectedEof | DecodeError::Malformed) => {
                undecoded(frame, "malformed")
            }
        }
    }
}

fn undecoded(frame: &[u8], why: &str) -> String {
    format!("[defmt frame of {} bytes: {why}]\n", frame.len())
}

/// A whole console stream to text: text unchanged, frames decoded (or, without a table,
/// replaced by a note).
#[derive(Debug)]
pub struct ConsoleDecoder {
    splitter: Splitter,
    frames: Option<FrameDecoder>,
}

impl ConsoleDecoder {
    /// A decoder; `frames`: the table of the image that runs, if known.
    pub fn new(frames: Option<FrameDecoder>) -> Self {
        Self {
            splitter: Splitter::default(),
            frames,
        }
    }

    /// Feeds console bytes; appends the text to show to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        let frames = self.frames.as_ref();
        self.splitter.feed(bytes, &mut |p| match p {
            Piece::Text(t) => out.extend_from_slice(t),
            Piece::Frame(f) => {
                let line = match frames {
                    Some(d) => d.line(&f),
                    None => undecoded(&f, "no ELF given to decode it"),
                };
                out.extend_from_slice(line.as_bytes());
            }
        });
    }
}

/// `keelctl console decode`: copies `input` to `output` as it arrives, decoding frames.
pub fn decode_stream(
    frames: Option<FrameDecoder>,
    input: &mut dyn Read,
    output: &mut dyn Write,
) -> Result<()> {
    let mut dec = ConsoleDecoder::new(frames);
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::with_capacity(8192);
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        out.clear();
        dec.feed(&buf[..n], &mut out);
        // The reader may be gone (QEMU's user quit): stop quietly then.
        if output
            .write_all(&out)
            .and_then(|()| output.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(chunks: &[&[u8]]) -> Vec<Piece<'static>> {
        let mut s = Splitter::default();
        let mut v = Vec::new();
        for c in chunks {
            s.feed(c, &mut |p| {
                v.push(match p {
                    Piece::Text(t) => Piece::Text(Vec::leak(t.to_vec())),
                    Piece::Frame(f) => Piece::Frame(f),
                })
            });
        }
        v
    }

    #[test]
    fn text_passes_and_frames_are_cut_out_across_chunk_boundaries() {
        let got = pieces(&[b"keel: ready\r\n\xff\x01\x02", b"\x03\x00more\xff\x04\x00"]);
        assert_eq!(
            got,
            vec![
                Piece::Text(b"keel: ready\r\n"),
                Piece::Frame(vec![1, 2, 3]),
                Piece::Text(b"more"),
                Piece::Frame(vec![4]),
            ]
        );
    }

    #[test]
    fn a_frame_cut_short_by_an_end_byte_leaves_the_text_after_it_alone() {
        // A crash report ends an open frame with 0x00 and a newline before its own text.
        let got = pieces(&[b"\xff\x05\x06\x00\npanicked at x\n"]);
        assert_eq!(
            got,
            vec![Piece::Frame(vec![5, 6]), Piece::Text(b"\npanicked at x\n")]
        );
    }

    #[test]
    fn without_a_table_frames_become_a_note_and_text_is_untouched() {
        let mut d = ConsoleDecoder::new(None);
        let mut out = Vec::new();
        d.feed(b"a\n\xff\x01\x02\x00b\n", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\n[defmt frame of 2 bytes: no ELF given to decode it]\nb\n"
        );
    }
}
