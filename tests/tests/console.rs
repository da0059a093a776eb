//! The console's log records: defmt frames between lines of text, decoded on the host with
//! the image's ELF (`keel_host_tools::console`, `keelctl console decode`, the harness).

use keel_host_tools::console::{ConsoleDecoder, FrameDecoder, Splitter};
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, ScratchFile, elf, image, keelctl, root, run_bounded};
use object::{Object, ObjectSection, ObjectSymbol};
use std::process::Command;

/// The index of a log statement in an ELF's `.defmt` table: the address of its symbol, whose
/// name is the JSON defmt's macros give it (`{"package":..,"tag":"defmt_info","data":FMT,..}`).
/// Read here with `object`, independently of defmt-decoder.
fn index_of(elf_bytes: &[u8], tag: &str, format: &str) -> u16 {
    let file = object::File::parse(elf_bytes).expect("parsing the ELF");
    let defmt = file
        .section_by_name(".defmt")
        .expect(".defmt section")
        .index();
    let want_data = format!("\"data\":{}", serde_json::to_string(format).unwrap());
    let want_tag = format!("\"tag\":\"{tag}\"");
    let found: Vec<u64> = file
        .symbols()
        .filter(|s| s.section_index() == Some(defmt))
        .filter(|s| {
            let n = s.name().unwrap_or("");
            n.contains(&want_data) && n.contains(&want_tag)
        })
        .map(|s| s.address())
        .collect();
    assert_eq!(found.len(), 1, "{format:?}: {found:?}");
    u16::try_from(found[0]).expect("index fits the frame's u16")
}

/// A frame as the firmware's logger writes it: `0xFF`, rzCOBS by defmt's own encoder, `0x00`.
fn wire_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = defmt::Encoder::new();
    enc.start_frame(|b| out.extend_from_slice(b));
    // The encoder's first frame ever starts with a 0x00 (see keel_hal::console).
    out.push(0xFF);
    enc.write(payload, |b| out.extend_from_slice(b));
    enc.end_frame(|b| out.extend_from_slice(b));
    out
}

#[test]
fn frames_of_the_real_encoder_decode_with_the_release_table_between_text() {
    let path = elf(Build::Release);
    let bytes = std::fs::read(&path).unwrap();
    // defmt's frame: u16 index (LE), the timestamp (`{=u64:us}`: 8 bytes LE), the arguments
    // (none for this statement).
    let idx = index_of(&bytes, "defmt_info", "health: clean shutdown recorded");
    let mut payload = idx.to_le_bytes().to_vec();
    payload.extend_from_slice(&1_234_567u64.to_le_bytes());
    let mut console = b"Keel 0.1.0 (git x) release build\r\n".to_vec();
    console.extend(wire_frame(&payload));
    console.extend_from_slice(b"keel: ready in 1.0 ms\r\n");
    let mut dec = ConsoleDecoder::new(Some(FrameDecoder::from_elf(&bytes).unwrap()));
    let mut out = Vec::new();
    // One byte at a time: frames and text split anywhere.
    for b in &console {
        dec.feed(std::slice::from_ref(b), &mut out);
    }
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "Keel 0.1.0 (git x) release build\r\n\
         [    1.234567] INFO  health: clean shutdown recorded\n\
         keel: ready in 1.0 ms\r\n"
    );

    // A frame cut short (a lost byte) is reported, not misprinted, and text goes on.
    let mut cut = wire_frame(&payload);
    cut.remove(3);
    let mut dec = ConsoleDecoder::new(Some(FrameDecoder::from_elf(&bytes).unwrap()));
    let mut out = Vec::new();
    dec.feed(&cut, &mut out);
    dec.feed(b"after\n", &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with("after\n"), "{text}");
    assert!(!text.contains("clean shutdown"), "{text}");
}

#[test]
fn the_console_carries_frames_not_strings_and_keelctl_decodes_them() {
    // The test build powers off after `keel: ready` (keel.test=exit); the raw console is
    // what QEMU wrote, captured here without the harness's decoding.
    let img = image(Build::Test);
    let out = Command::new(root().join("qemu/run"))
        .args([
            "--image",
            img.to_str().unwrap(),
            "--append",
            "keel.test=exit",
        ])
        .args(["--timeout", &BOOT_TIMEOUT.as_secs().to_string()])
        .env("KEEL_QEMU_DEFAULT_PORTS", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running qemu/run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let raw = out.stdout;
    let text_of = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    // Contract lines stay text; the log records are frames: their strings are not there.
    assert!(
        text_of(&raw).contains("keel: ready in "),
        "{}",
        text_of(&raw)
    );
    assert!(text_of(&raw).contains(") test build"));
    assert!(!text_of(&raw).contains("using boot arguments"));
    let mut frames = 0;
    Splitter::default().feed(&raw, &mut |p| {
        if let keel_host_tools::console::Piece::Frame(_) = p {
            frames += 1;
        }
    });
    assert!(frames >= 5, "only {frames} frames");

    let capture = ScratchFile::new("console-raw", 0);
    std::fs::write(capture.path(), &raw).unwrap();
    let test_elf = elf(Build::Test);
    let r = run_bounded(
        Command::new(keelctl())
            .args(["console", "decode", "--elf"])
            .arg(&test_elf)
            .arg(capture.path()),
        keel_tests::RUN_TIMEOUT,
    );
    assert_eq!(r.code, 0, "{r:?}");
    let decoded = r.stdout;
    for needle in [
        "] INFO  config: no provisioned configuration; using boot arguments",
        "] INFO  nvmf: namespace 1 = RAM 256 MiB: 256 MiB, 512-byte blocks",
        "] INFO  nvmf: subsystem nqn.2026-11.dev.keel:default serial KEEL",
        "keel: ready in ",
        "keel: test exit",
    ] {
        assert!(decoded.contains(needle), "no {needle:?} in:\n{decoded}");
    }
    assert!(!decoded.contains("[defmt frame"), "{decoded}");
    assert!(!decoded.contains('\u{fffd}'), "{decoded}");

    // The harness decodes the same way for every test (the banner names the build).
    let mut q = Qemu::boot(Build::Test, &["--append", "keel.test=exit"]);
    assert_eq!(q.wait_exit(BOOT_TIMEOUT), Ok(0));
    let c = q.console();
    assert!(
        c.contains("] INFO  nvmf: namespace 1 = RAM 256 MiB: 256 MiB, 512-byte blocks"),
        "{c}"
    );
    assert!(!c.contains("[defmt frame"), "{c}");
}
