//! Encryption at rest end to end: NVMe/TCP from the host → the firmware in QEMU, which wraps
//! the drive namespace in AES-XTS (`keel.xts=NSID:HEXKEY`) → its NVMe driver → QEMU's NVMe
//! device → the raw backing file, which the tests search on the host.
//!
//! - a known pattern written over NVMe/TCP reads back, and after QEMU is gone the backing file
//!   holds no trace of it (no 16-byte marker anywhere), while the blocks it went to changed;
//! - the data survives a new QEMU with the same key, and reads back as noise with another key;
//! - a key whose halves are equal is refused: an error on the console, the namespace absent,
//!   the other namespaces keep their NSIDs (and, served in plaintext, show that the search
//!   would find the pattern if it were there);
//! - XTS-AES-128 (64 hex digits) works the same way;
//! - no boot prints a key: the banner shows `keel.xts=N:<redacted>`.

use keel_host_tools::nvme::{Controller, Params};
use keel_tests::{BOOT_TIMEOUT, Build, Qemu, ScratchFile, free_port};

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:c4f70000-7e57-4d0e-a11d-000000000c0d";
const BS: u32 = 512;
/// 16 bytes that appear in the plaintext and nowhere else.
const MARKER: &[u8; 16] = b"KEEL:XTS:MARKER!";

/// XTS-AES-256 development keys (Key1 ‖ Key2, 128 hex digits).
const KEY_A: &str = concat!(
    "8f3a1c5e9b7d2460f1e3c5a79b8d0f21436587a9cbed0f1e2d3c4b5a69788796",
    "0a1b2c3d4e5f60718293a4b5c6d7e8f9f8e7d6c5b4a3928170f6e5d4c3b2a190"
);
const KEY_B: &str = concat!(
    "1122334455667788990011223344556677889900aabbccddeeff001122334455",
    "66778899aabbccddeeff00112233445566778899aabbccddeeff0011223344ff"
);
/// XTS-AES-128 (64 hex digits).
const KEY_128: &str = "00112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// Two equal halves: refused (IEEE 1619 §5.1).
const KEY_EQUAL: &str = concat!(
    "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a",
    "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
);

fn params(port: u16) -> Params {
    Params::new(format!("127.0.0.1:{port}"), SUBNQN, HOSTNQN)
}

/// Boots the release firmware on `disk` with these boot arguments and waits for `keel: ready`.
/// Every console is checked for key material.
fn boot(disk: &ScratchFile, append: &str) -> (Qemu, u16) {
    let port = free_port();
    let mut q = Qemu::boot(
        Build::Release,
        &[
            "--nvmf-port",
            &port.to_string(),
            "--disk",
            disk.path().to_str().expect("UTF-8 path"),
            "--append",
            append,
        ],
    );
    q.wait_for("keel: ready", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_no_key(&q.console());
    (q, port)
}

/// No key, nor an 8-byte piece of one, is on the console; the banner shows the redaction.
fn assert_no_key(console: &str) {
    for key in [KEY_A, KEY_B, KEY_128, KEY_EQUAL] {
        for piece in key.as_bytes().chunks(16) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !console.to_ascii_lowercase().contains(piece),
                "the console shows key material {piece:?}:\n{console}"
            );
        }
    }
    let banner = console
        .lines()
        .find(|l| l.starts_with("bootargs:"))
        .unwrap_or_else(|| panic!("no bootargs line:\n{console}"));
    assert!(banner.contains(":<redacted>"), "{banner}");
}

/// The plaintext: the marker at the start of every 64 bytes, then position-dependent bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| match i % 64 {
            j @ 0..16 => MARKER[j],
            j => ((i / 64) as u8).wrapping_mul(31).wrapping_add(j as u8),
        })
        .collect()
}

fn count_marker(data: &[u8]) -> usize {
    data.windows(MARKER.len()).filter(|w| w == MARKER).count()
}

/// Connects, checks the active namespaces, runs `f` on an I/O queue, disconnects.
fn with_io<T>(
    port: u16,
    active: &[u32],
    f: impl FnOnce(&mut keel_host_tools::nvme::IoQueue) -> T,
) -> T {
    let ctrl = Controller::connect(params(port)).unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(ctrl.active_namespaces().unwrap(), active);
    for &nsid in active {
        assert_eq!(ctrl.identify_namespace(nsid).unwrap().block_size(), BS);
    }
    ctrl.set_io_queues(1).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();
    let r = f(&mut io);
    io.close().unwrap();
    ctrl.close().unwrap();
    r
}

/// Stops QEMU (a release build runs until killed); the drive's writes are in the file by
/// then (each Write completed only after QEMU's NVMe device wrote it).
fn stop(mut q: Qemu) -> String {
    q.kill();
    q.console()
}

const LBA: u64 = 40;
const LEN: usize = 256 << 10;

#[test]
fn xts_256_pattern_never_reaches_the_disk_and_needs_its_key() {
    let disk = ScratchFile::new("crypto-xts256.img", 16 << 20);
    let data = pattern(LEN);
    assert_eq!(count_marker(&data), LEN / 64);
    let ns = "keel.ns=drive:0";

    // Write and read back through the encrypted namespace.
    let (q, port) = boot(&disk, &format!("{ns} keel.xts=1:{KEY_A}"));
    let c = q.console();
    assert!(
        c.contains("crypto: namespace 1 encrypted with aes-256-xts"),
        "{c}"
    );
    assert!(c.contains("keel.xts=1:<redacted>"), "{c}");
    let back = with_io(port, &[1], |io| {
        io.write(1, LBA, &data, BS).unwrap();
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    assert!(back == data, "the pattern did not read back");
    stop(q);

    // The backing file: no marker anywhere, and the blocks written are not zero any more.
    let file = std::fs::read(disk.path()).unwrap();
    assert_eq!(count_marker(&file), 0, "plaintext reached the backing file");
    let at_rest = &file[(LBA * u64::from(BS)) as usize..][..LEN];
    assert!(
        at_rest
            .chunks(BS as usize)
            .all(|b| b.iter().any(|&x| x != 0)),
        "some written block is still zero in the file"
    );
    assert!(at_rest != &data[..]);
    // Ciphertext looks random: every byte value occurs, none dominates.
    let mut hist = [0usize; 256];
    at_rest.iter().for_each(|&b| hist[b as usize] += 1);
    let max = *hist.iter().max().unwrap();
    assert!(
        hist.iter().all(|&n| n > 0) && max < 3 * LEN / 256,
        "the ciphertext is not uniform: max count {max}"
    );

    // A new QEMU with the same key reads the pattern back.
    let (q, port) = boot(&disk, &format!("{ns} keel.xts=1:{KEY_A}"));
    let back = with_io(port, &[1], |io| {
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    assert!(back == data, "the pattern did not survive a restart");
    stop(q);

    // Another key: the same blocks read back as noise.
    let (q, port) = boot(&disk, &format!("{ns} keel.xts=1:{KEY_B}"));
    let noise = with_io(port, &[1], |io| {
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    stop(q);
    assert_eq!(count_marker(&noise), 0, "another key showed plaintext");
    let same = noise.iter().zip(&data).filter(|(a, b)| a == b).count();
    assert!(
        same < LEN / 64,
        "{same} of {LEN} bytes match the pattern under another key"
    );
    assert!(noise != at_rest, "another key returned the raw ciphertext");
    assert!(
        std::fs::read(disk.path()).unwrap() == file,
        "reading changed the file"
    );
}

#[test]
fn equal_halves_are_refused_and_other_namespaces_keep_their_ids() {
    // NSID 1 = the first 8 MiB of the drive (key refused), NSID 2 = the next 8 MiB, plain.
    let disk = ScratchFile::new("crypto-equal.img", 16 << 20);
    let (q, port) = boot(
        &disk,
        &format!("keel.ns=drive:0:1:0+8,drive:0:1:8+8 keel.xts=1:{KEY_EQUAL}"),
    );
    let c = q.console();
    assert!(
        c.contains("crypto: namespace 1: the two halves of the XTS key are equal: the namespace is not served"),
        "{c}"
    );
    assert!(!c.contains("nvmf: namespace 1 ="), "{c}");
    assert!(c.contains("nvmf: namespace 2 ="), "{c}");
    let data = pattern(64 << 10);
    with_io(port, &[2], |io| io.write(2, 0, &data, BS).unwrap());
    stop(q);
    // The plaintext namespace is the control: the same search finds its pattern in the file,
    // at its place.
    let file = std::fs::read(disk.path()).unwrap();
    assert_eq!(count_marker(&file), data.len() / 64);
    assert!(file[8 << 20..][..data.len()] == data[..]);
}

#[test]
fn xts_128_works_too() {
    let disk = ScratchFile::new("crypto-xts128.img", 16 << 20);
    let data = pattern(LEN);
    let append = format!("keel.ns=drive:0 keel.xts=1:{KEY_128}");
    let (q, port) = boot(&disk, &append);
    let c = q.console();
    assert!(
        c.contains("crypto: namespace 1 encrypted with aes-128-xts"),
        "{c}"
    );
    let back = with_io(port, &[1], |io| {
        io.write(1, LBA, &data, BS).unwrap();
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    assert!(back == data, "the pattern did not read back");
    stop(q);
    let file = std::fs::read(disk.path()).unwrap();
    assert_eq!(count_marker(&file), 0, "plaintext reached the backing file");
    assert!(file[(LBA * u64::from(BS)) as usize..][..LEN] != data[..]);

    // Same key again reads back; the 256-bit key over the same blocks does not.
    let (q, port) = boot(&disk, &append);
    let back = with_io(port, &[1], |io| {
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    stop(q);
    assert!(back == data, "the pattern did not survive a restart");
    let (q, port) = boot(&disk, &format!("keel.ns=drive:0 keel.xts=1:{KEY_A}"));
    let noise = with_io(port, &[1], |io| {
        io.read(1, LBA, (LEN / BS as usize) as u64, BS).unwrap()
    });
    stop(q);
    assert_eq!(count_marker(&noise), 0);
}
