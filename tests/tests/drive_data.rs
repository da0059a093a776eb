//! The drive data path end to end: NVMe/TCP from the host → the firmware in QEMU → its
//! poll-mode NVMe driver → QEMU's own NVMe device (`-device nvme`) → the raw backing file,
//! which the tests read and write on the host.
//!
//! - writes land in the backing file at LBA × 512, and nothing around them moves;
//! - the data survives a firmware restart (a new QEMU on the same file), and what the host put
//!   in the file is what NVMe/TCP reads;
//! - 1 MiB and 4 MiB transfers at unaligned LBAs (split at the target's MDTS by the initiator,
//!   pipelined, and split again at the drive's MDTS by the driver on a drive with a small one);
//! - Flush over NVMe/TCP reaches the drive (QEMU's `pci_nvme_io_cmd` trace);
//! - slices of one drive (`keel.ns=drive:0:1:0+16,drive:0:1:16+16`) land at their offsets and
//!   are fenced by LBA Out of Range;
//! - a drive namespace beside a RAM namespace (`keel.ns=ram:32,drive:0`).

use keel_host_tools::nvme::{Connection, Controller, NvmeError, Params};
use keel_nvmf_tcp::{HostConfig, Sqe};
use keel_tests::{Qemu, ScratchFile, boot_nvmf};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const SUBNQN: &str = "nqn.2026-11.dev.keel:default";
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:0d71e5a1-7e57-4d0e-a11d-d15c0000d47a";
const BS: u32 = 512;
const MIB: u64 = 1 << 20;

fn params(port: u16) -> Params {
    Params::new(format!("127.0.0.1:{port}"), SUBNQN, HOSTNQN)
}

fn connect(port: u16) -> Controller {
    Controller::connect(params(port)).unwrap_or_else(|e| panic!("connect: {e}"))
}

/// A distinctive, position-dependent pattern: no two 512-byte blocks of it are equal, and it
/// differs per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn read_file(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).expect("opening the backing file");
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).expect("reading the backing file");
    b
}

fn write_file(path: &Path, off: u64, data: &[u8]) {
    let mut f = File::options()
        .write(true)
        .open(path)
        .expect("opening the backing file");
    f.seek(SeekFrom::Start(off)).expect("seek");
    f.write_all(data).expect("writing the backing file");
    f.sync_all().expect("sync");
}

/// First differing byte, for readable failures on large buffers.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (block {}): got {:02x?}, want {:02x?}",
            i / BS as usize,
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}

fn status_of(r: Result<(), NvmeError>, what: &str) -> (u8, u8) {
    match r {
        Err(e) => {
            let st = e
                .status()
                .unwrap_or_else(|| panic!("{what}: not a status: {e}"));
            (st.sct, st.sc)
        }
        Ok(()) => panic!("{what}: succeeded"),
    }
}

/// An I/O queue opened by hand, for commands the library's `IoQueue` does not build (Flush):
/// Connect (NVMe-oF 1.1 Figure 19/20) with the association's CNTLID, then raw SQEs.
struct RawQueue {
    conn: Connection,
    timeout: Duration,
}

impl RawQueue {
    fn open(ctrl: &Controller, qid: u16) -> RawQueue {
        let p = ctrl.params();
        let cfg = HostConfig {
            digests: p.digests,
            slots: 8,
            in_capsule_limit: ctrl.in_capsule_limit(),
            ..HostConfig::default()
        };
        let conn = Connection::open(ctrl.peer(), cfg, p.timeout)
            .unwrap_or_else(|e| panic!("I/O queue {qid}: {e}"));
        let mut sqe = [0u8; 64];
        sqe[0] = 0x7F; // Fabrics
        sqe[4] = 0x01; // Connect
        sqe[42..44].copy_from_slice(&qid.to_le_bytes());
        sqe[44..46].copy_from_slice(&7u16.to_le_bytes()); // SQSIZE 8 (0's based)
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&p.hostid);
        data[16..18].copy_from_slice(&ctrl.cntlid.to_le_bytes());
        data[256..256 + p.subnqn.len()].copy_from_slice(p.subnqn.as_bytes());
        data[512..512 + p.hostnqn.len()].copy_from_slice(p.hostnqn.as_bytes());
        let mut q = RawQueue {
            conn,
            timeout: p.timeout,
        };
        let (sct, sc) = q.run(sqe, Some((data, 1024)), "Connect");
        assert_eq!((sct, sc), (0, 0), "Connect of raw I/O queue {qid}");
        q
    }

    /// Runs one command; returns (SCT, SC).
    fn run(&mut self, sqe: [u8; 64], data: Option<(Vec<u8>, u32)>, what: &str) -> (u8, u8) {
        let cid = self
            .conn
            .submit(Sqe::from_bytes(&sqe), data)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let done = self
            .conn
            .wait(cid, self.timeout, what)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        (done.cqe.status.sct, done.cqe.status.sc)
    }

    /// NVM Flush (opcode 00h) of `nsid`.
    fn flush(&mut self, nsid: u32) -> (u8, u8) {
        let mut sqe = [0u8; 64];
        sqe[4..8].copy_from_slice(&nsid.to_le_bytes());
        self.run(sqe, None, &format!("Flush (NSID {nsid:#x})"))
    }
}

/// QEMU trace lines (`-trace pci_nvme_io_cmd`) of NVM Flush commands the drive received.
fn drive_flushes(console: &str) -> usize {
    console
        .lines()
        .filter(|l| l.contains("pci_nvme_io_cmd") && l.contains("NVME_NVM_CMD_FLUSH"))
        .count()
}

/// Waits until the drive has seen more than `before` flushes; returns the new count.
fn wait_drive_flush(q: &Qemu, before: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = drive_flushes(&q.console());
        if n > before {
            return n;
        }
        if Instant::now() > deadline {
            panic!(
                "the drive saw no new NVM Flush (still {n}); console tail:\n{}",
                tail(&q.console(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Block counts of the Writes the drive received (QEMU's `pci_nvme_write` trace: "... nlb N
/// count BYTES lba 0x...").
fn drive_write_sizes(q: &Qemu) -> Vec<u32> {
    // The trace is written by QEMU's stderr reader thread; give it a moment to catch up.
    std::thread::sleep(Duration::from_millis(300));
    q.console()
        .lines()
        .filter(|l| l.contains("pci_nvme_write "))
        .filter_map(|l| l.split(" nlb ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

#[test]
fn write_over_nvmf_lands_in_the_backing_file_at_the_lba_offset() {
    let disk = ScratchFile::new("data-offset.img", 64 * MIB);
    let path = disk.path().to_str().unwrap();
    let (mut q, port) = boot_nvmf(&["--disk", path]);
    let c = q.console();
    assert!(
        c.contains("nvmf: namespace 1 = drive 0 namespace 1: 64 MiB, 512-byte blocks"),
        "{c}"
    );

    let ctrl = connect(port);
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1]);
    let ns = ctrl.identify_namespace(1).unwrap();
    assert_eq!((ns.block_size(), ns.nsze), (BS, 64 * MIB / BS as u64));
    ctrl.set_io_queues(2).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();

    // Three writes: an odd LBA in the middle, the first block, the last block.
    let last = 64 * MIB / BS as u64 - 1;
    let writes = [
        (12_345u64, pattern(1, 8 * BS as usize)),
        (0, pattern(2, BS as usize)),
        (last, pattern(3, BS as usize)),
    ];
    for (lba, data) in &writes {
        io.write(1, *lba, data, BS).unwrap();
    }
    let mut raw = RawQueue::open(&ctrl, 2);
    assert_eq!(raw.flush(1), (0, 0));

    // With QEMU still running (it writes through to the file: cache=writeback, no O_DIRECT).
    for (lba, data) in &writes {
        let got = read_file(disk.path(), lba * BS as u64, data.len());
        assert_same(
            &got,
            data,
            &format!("backing file at LBA {lba} (QEMU running)"),
        );
    }
    // The neighbours of the middle write are untouched.
    assert_eq!(
        read_file(disk.path(), 12_344 * BS as u64, 512),
        vec![0; 512]
    );
    assert_eq!(
        read_file(disk.path(), 12_353 * BS as u64, 512),
        vec![0; 512]
    );
    // And NVMe/TCP reads the same back.
    assert_same(
        &io.read(1, 12_345, 8, BS).unwrap(),
        &writes[0].1,
        "read back",
    );
    drop(raw);
    drop(io);
    ctrl.close().unwrap();
    q.kill();

    // After QEMU has gone, the file holds exactly these blocks and zeros elsewhere.
    let mut f = File::open(disk.path()).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert_eq!(all.len() as u64, 64 * MIB);
    let mut want = vec![0u8; all.len()];
    for (lba, data) in &writes {
        let o = (*lba * BS as u64) as usize;
        want[o..o + data.len()].copy_from_slice(data);
    }
    assert_same(&all, &want, "whole backing file after QEMU exited");
}

#[test]
fn data_survives_a_firmware_restart_on_the_same_file() {
    let disk = ScratchFile::new("data-restart.img", 32 * MIB);
    let path = disk.path().to_str().unwrap().to_string();
    // Put something in the file on the host first: NVMe/TCP must read it.
    let from_host = pattern(10, 64 * 1024);
    write_file(disk.path(), 5 * MIB, &from_host);

    let a = pattern(11, 256 * 1024);
    let b = pattern(12, 4096);
    {
        let (mut q, port) = boot_nvmf(&["--disk", &path]);
        let ctrl = connect(port);
        ctrl.set_io_queues(1).unwrap();
        let mut io = ctrl.io_queue(1, 32).unwrap();
        assert_same(
            &io.read(1, 5 * MIB / BS as u64, (from_host.len() / 512) as u64, BS)
                .unwrap(),
            &from_host,
            "host-written data read over NVMe/TCP",
        );
        io.write(1, 777, &a, BS).unwrap();
        io.write(1, 60_001, &b, BS).unwrap();
        drop(io);
        ctrl.close().unwrap();
        // No Flush: QEMU is killed (SIGKILL) with the data in the host's page cache, which
        // is where a killed QEMU leaves it.
        q.kill();
    }
    let (_q, port) = boot_nvmf(&["--disk", &path]);
    let ctrl = connect(port);
    ctrl.set_io_queues(1).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();
    assert_same(
        &io.read(1, 777, (a.len() / 512) as u64, BS).unwrap(),
        &a,
        "LBA 777 after restart",
    );
    assert_same(
        &io.read(1, 60_001, (b.len() / 512) as u64, BS).unwrap(),
        &b,
        "LBA 60001 after restart",
    );
    assert_same(
        &io.read(1, 5 * MIB / BS as u64, (from_host.len() / 512) as u64, BS)
            .unwrap(),
        &from_host,
        "host-written data after restart",
    );
    assert_eq!(io.read(1, 776, 1, BS).unwrap(), vec![0; 512]);
    drop(io);
    ctrl.close().unwrap();
}

/// 1 MiB and 4 MiB at unaligned LBAs: written and read back, checked in the file too.
fn large_round_trips(port: u16, disk: &Path) {
    let ctrl = connect(port);
    // The initiator splits at the target's MDTS (128 KiB).
    assert_eq!(ctrl.max_transfer(), 128 * 1024);
    ctrl.set_io_queues(1).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();
    for (lba, len, seed) in [(7u64, MIB, 21u64), (4099, 4 * MIB, 22), (33_333, MIB, 23)] {
        let data = pattern(seed, len as usize);
        io.write(1, lba, &data, BS).unwrap();
        let back = io.read(1, lba, len / BS as u64, BS).unwrap();
        assert_same(&back, &data, &format!("{} KiB at LBA {lba}", len / 1024));
        let file = read_file(disk, lba * BS as u64, len as usize);
        assert_same(
            &file,
            &data,
            &format!("backing file, {} KiB at LBA {lba}", len / 1024),
        );
    }
    // A read across the ends of two earlier transfers (1 MiB at LBA 7 covers 7..2055; the
    // 4 MiB one starts at 4099), spanning data, zeros and data.
    let span = io.read(1, 2000, 2200, BS).unwrap();
    let first = pattern(21, MIB as usize);
    assert_same(&span[..55 * 512], &first[(2000 - 7) * 512..], "span head");
    assert!(span[55 * 512..(4099 - 2000) * 512].iter().all(|&b| b == 0));
    assert_same(
        &span[(4099 - 2000) * 512..],
        &pattern(22, 4 * MIB as usize)[..(2200 - 2099) * 512],
        "span tail",
    );

    // One command above the target's MDTS is refused, not truncated.
    let r = io.submit(
        keel_host_tools::nvme::IoKind::Write,
        1,
        50_000,
        512,
        vec![0xAB; 256 * 1024],
        256 * 1024,
    );
    let cid = r.unwrap();
    let (got, done) = io.next_completion().unwrap();
    assert_eq!(got, cid);
    let st = done.cqe.status;
    assert_eq!(
        (st.sct, st.sc),
        (0, 0x0F),
        "a 256 KiB Write above MDTS 128 KiB: Data SGL Length Invalid"
    );
    assert_eq!(read_file(disk, 50_000 * 512, 512), vec![0; 512]);
    drop(io);
    ctrl.close().unwrap();
}

#[test]
fn megabyte_transfers_are_split_and_reassembled() {
    let disk = ScratchFile::new("data-large.img", 64 * MIB);
    let (q, port) = boot_nvmf(&[
        "--disk",
        disk.path().to_str().unwrap(),
        "--",
        "-trace",
        "pci_nvme_write",
    ]);
    assert!(
        q.console().contains("max transfer 512 KiB"),
        "{}",
        q.console()
    );
    large_round_trips(port, disk.path());
    // The drive got the 128 KiB commands whole (its own limit is 512 KiB).
    let sizes = drive_write_sizes(&q);
    assert_eq!(sizes.iter().max(), Some(&256), "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&n| n == 256).count() >= 48,
        "{sizes:?}"
    );
}

#[test]
fn transfers_are_split_at_a_small_drive_mdts() {
    // MDTS 2 (16 KiB with 4 KiB pages): every 128 KiB NVMe/TCP command becomes eight drive
    // commands in the driver.
    let disk = ScratchFile::new("data-mdts.img", 64 * MIB);
    let d = format!("if=none,id=small,format=raw,file={}", disk.path().display());
    let (q, port) = boot_nvmf(&[
        "--",
        "-drive",
        &d,
        "-device",
        "nvme,serial=keel-small-mdts,mdts=2,drive=small",
        "-trace",
        "pci_nvme_write",
    ]);
    let c = q.console();
    let l = c
        .lines()
        .find(|l| l.contains("serial keel-small-mdts"))
        .unwrap_or_else(|| panic!("{c}"));
    assert!(l.contains("max transfer 16 KiB"), "{l}");
    large_round_trips(port, disk.path());
    // The driver cut every 128 KiB command into 16 KiB drive commands.
    let sizes = drive_write_sizes(&q);
    assert_eq!(sizes.iter().max(), Some(&32), "{sizes:?}");
    assert!(
        sizes.iter().filter(|&&n| n == 32).count() >= 48 * 8,
        "{sizes:?}"
    );
}

#[test]
fn flush_over_nvmf_reaches_the_drive() {
    let disk = ScratchFile::new("data-flush.img", 16 * MIB);
    let (q, port) = boot_nvmf(&[
        "--disk",
        disk.path().to_str().unwrap(),
        "--append",
        "keel.ns=drive:0,ram:8",
        "--",
        "-trace",
        "pci_nvme_io_cmd",
    ]);
    let c = q.console();
    assert!(c.contains("volatile write cache yes"), "{c}");
    let ctrl = connect(port);
    ctrl.set_io_queues(2).unwrap();
    let mut io = ctrl.io_queue(1, 8).unwrap();
    io.write(1, 100, &pattern(31, 4096), BS).unwrap();
    let mut raw = RawQueue::open(&ctrl, 2);

    let before = drive_flushes(&q.console());
    assert_eq!(raw.flush(1), (0, 0), "Flush of the drive namespace");
    let after = wait_drive_flush(&q, before);
    // The trace names the drive's namespace.
    let line = q
        .console()
        .lines()
        .rfind(|l| l.contains("NVME_NVM_CMD_FLUSH"))
        .map(String::from)
        .unwrap();
    assert!(line.contains("nsid 0x1 "), "{line}");

    // A RAM namespace's Flush succeeds without touching the drive.
    assert_eq!(raw.flush(2), (0, 0), "Flush of the RAM namespace");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        drive_flushes(&q.console()),
        after,
        "a RAM namespace's Flush reached the drive"
    );
    // A namespace that does not exist: Invalid Namespace or Format.
    assert_eq!(raw.flush(9), (0, 0x0B), "Flush of NSID 9");
    drop(raw);
    drop(io);
    ctrl.close().unwrap();
}

#[test]
fn slices_of_one_drive_land_at_their_offsets_and_are_fenced() {
    let disk = ScratchFile::new("data-slices.img", 64 * MIB);
    let (q, port) = boot_nvmf(&[
        "--disk",
        disk.path().to_str().unwrap(),
        "--append",
        "keel.ns=drive:0:1:0+16,drive:0:1:16+16",
    ]);
    let c = q.console();
    assert!(
        c.contains("nvmf: namespace 1 = drive 0 namespace 1 from 0 MiB, 16 MiB: 16 MiB"),
        "{c}"
    );
    assert!(
        c.contains("nvmf: namespace 2 = drive 0 namespace 1 from 16 MiB, 16 MiB: 16 MiB"),
        "{c}"
    );
    let ctrl = connect(port);
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2]);
    let blocks = 16 * MIB / BS as u64;
    for nsid in [1, 2] {
        let ns = ctrl.identify_namespace(nsid).unwrap();
        assert_eq!((ns.block_size(), ns.nsze), (BS, blocks), "NSID {nsid}");
    }
    ctrl.set_io_queues(2).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();

    // NSID 2 LBA 0 is byte 16 MiB of the drive; NSID 1's last block is just before it.
    let two = pattern(41, 8192);
    let one_last = pattern(42, 512);
    io.write(2, 0, &two, BS).unwrap();
    io.write(1, blocks - 1, &one_last, BS).unwrap();
    let mut raw = RawQueue::open(&ctrl, 2);
    assert_eq!(raw.flush(1), (0, 0));
    assert_eq!(raw.flush(2), (0, 0));
    assert_same(
        &read_file(disk.path(), 16 * MIB, two.len()),
        &two,
        "NSID 2 LBA 0 in the file",
    );
    assert_same(
        &read_file(disk.path(), 16 * MIB - 512, 512),
        &one_last,
        "NSID 1 last LBA in the file",
    );
    // NSID 2's last block is byte 32 MiB - 512; what follows in the file is nobody's.
    let two_last = pattern(43, 512);
    io.write(2, blocks - 1, &two_last, BS).unwrap();
    assert_same(
        &read_file(disk.path(), 32 * MIB - 512, 512),
        &two_last,
        "NSID 2 last LBA",
    );

    // Past NSID 1's end: LBA Out of Range (SCT 0, SC 80h), and NSID 2 is untouched.
    let junk = vec![0xEE; 4096];
    for (lba, what) in [
        (blocks - 1, "straddling NSID 1's end"),
        (blocks, "at NSID 1's end"),
        (blocks + 100, "beyond NSID 1's end"),
    ] {
        assert_eq!(
            status_of(io.write(1, lba, &junk, BS), what),
            (0, 0x80),
            "Write {what}"
        );
    }
    assert_eq!(
        status_of(io.read(1, blocks - 2, 4, BS).map(|_| ()), "read past end"),
        (0, 0x80)
    );
    assert_eq!(
        status_of(io.write(2, blocks - 4, &junk, BS), "NSID 2 past its end"),
        (0, 0x80)
    );
    assert_eq!(
        status_of(io.write(3, 0, &junk, BS), "NSID 3"),
        (0, 0x0B),
        "Invalid Namespace"
    );
    assert_same(
        &read_file(disk.path(), 16 * MIB, two.len()),
        &two,
        "NSID 2 after the refused writes",
    );
    assert_same(
        &read_file(disk.path(), 16 * MIB - 512, 512),
        &one_last,
        "NSID 1 last block",
    );
    assert_eq!(read_file(disk.path(), 32 * MIB, 4096), vec![0; 4096]);
    assert_same(
        &io.read(2, 0, 16, BS).unwrap(),
        &two,
        "NSID 2 LBA 0 over NVMe/TCP",
    );
    assert_same(
        &io.read(1, blocks - 1, 1, BS).unwrap(),
        &one_last,
        "NSID 1 last LBA",
    );
    drop(raw);
    drop(io);
    ctrl.close().unwrap();
}

#[test]
fn a_drive_namespace_beside_a_ram_namespace() {
    let disk = ScratchFile::new("data-ram.img", 64 * MIB);
    let (q, port) = boot_nvmf(&[
        "--disk",
        disk.path().to_str().unwrap(),
        "--append",
        "keel.ns=ram:32,drive:0",
    ]);
    let c = q.console();
    assert!(c.contains("nvmf: namespace 1 = RAM 32 MiB: 32 MiB"), "{c}");
    assert!(
        c.contains("nvmf: namespace 2 = drive 0 namespace 1: 64 MiB"),
        "{c}"
    );
    let ctrl = connect(port);
    assert_eq!(ctrl.active_namespaces().unwrap(), vec![1, 2]);
    assert_eq!(ctrl.identify_namespace(1).unwrap().nsze, 32 * MIB / 512);
    assert_eq!(ctrl.identify_namespace(2).unwrap().nsze, 64 * MIB / 512);
    ctrl.set_io_queues(1).unwrap();
    let mut io = ctrl.io_queue(1, 32).unwrap();
    let ram = pattern(51, 64 * 1024);
    let drv = pattern(52, 64 * 1024);
    io.write(1, 100, &ram, BS).unwrap();
    io.write(2, 100, &drv, BS).unwrap();
    assert_same(&io.read(1, 100, 128, BS).unwrap(), &ram, "RAM namespace");
    assert_same(&io.read(2, 100, 128, BS).unwrap(), &drv, "drive namespace");
    assert_same(
        &read_file(disk.path(), 100 * 512, drv.len()),
        &drv,
        "drive file",
    );
    // The RAM namespace's data is not in the drive.
    assert_eq!(read_file(disk.path(), 0, 100 * 512), vec![0; 100 * 512]);
    // The RAM namespace ends at 32 MiB; the drive does not.
    assert_eq!(
        status_of(io.write(1, 32 * MIB / 512, &ram[..512], BS), "RAM past end"),
        (0, 0x80)
    );
    io.write(2, 32 * MIB / 512, &ram[..512], BS).unwrap();
    drop(io);
    ctrl.close().unwrap();
}
