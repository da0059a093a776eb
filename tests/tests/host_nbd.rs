//! The NBD export of `keelctl host` driven by real clients (`qemu-io`/`qemu-img` from
//! qemu-utils, `nbdinfo`/`nbdcopy` from libnbd-bin, fio's nbd engine), over the host NVMe
//! driver, over a window file served by an in-process firmware (`Emulator`: a thread polling
//! a `PcieFunction` with a RAM namespace, as the firmware does over its ivshmem BAR).
//! Skipped (with a note) when a client is not installed.
//!
//! Concurrency is shown without timing: the emulated function is paused, a client sends
//! many requests, and the test waits until that many commands sit in the function's
//! submission queues (their tail doorbells) before letting it run again.

use keel_host_tools::host::{
    Emulator, EmulatorConfig, HostConfig, HostController, NbdConfig, NbdServer, Window,
};
use keel_nvme_pcie::layout;
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// I/O queue pairs and depth the server opens.
const QUEUES: u16 = 2;
const QD: u16 = 32;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) -> String {
    let r = keel_tests::run_bounded(cmd, Duration::from_secs(120));
    assert_eq!(r.code, 0, "{cmd:?} failed: {r:?}");
    r.stdout
}

/// Commands the host wrote to the function's I/O submission queues so far.
fn submitted(win: &Window) -> u32 {
    (1..=QUEUES)
        .map(|q| win.load32(layout::doorbell_offset(layout::sq_tail_doorbell(q))))
        .sum()
}

/// Runs `cmd` with the function paused until `n` more commands are in its submission queues
/// at once (bounded), then lets it run and waits for the client; returns its stdout.
fn with_n_in_flight(emu: &Emulator, win: &Window, n: u32, cmd: &mut Command) -> String {
    keel_tests::with_n_in_flight(
        |hold| emu.pause(hold),
        || submitted(win),
        n,
        Duration::from_secs(60),
        cmd,
    )
}

#[test]
fn nbd_clients_over_the_emulated_function() {
    if !have("qemu-io") {
        eprintln!("skipped: qemu-io (qemu-utils) not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("keel-host-nbd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("window");
    // The "firmware" side maps the file, the host side maps it again: two mappings of one
    // file, exactly as with QEMU's memory-backend-file.
    let fw_win = Arc::new(Window::create(&path, 64 << 20).unwrap());
    let emu = Emulator::start(
        fw_win,
        EmulatorConfig {
            namespaces: vec![16 << 20],
            ..EmulatorConfig::default()
        },
    )
    .unwrap();
    let win = Arc::new(Window::open(&path).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
    let (w2, st) = (win.clone(), stop.clone());
    // The server owns the driver: it lives on its own thread.
    let server = std::thread::spawn(move || {
        let ctrl = HostController::open(
            w2,
            &HostConfig {
                queues: QUEUES,
                depth: QD,
                timeout: Duration::from_secs(30),
            },
        )
        .unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = NbdServer::new(ctrl, l, NbdConfig::default()).unwrap();
        tx.send(s.local_addr().unwrap()).unwrap();
        s.serve(&st).unwrap();
        let stats = s.stats();
        s.shutdown().unwrap();
        stats
    });
    let url = format!("nbd://{}/", rx.recv().unwrap());

    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &url,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "write -P 0xa5 4096 512",
        "-c",
        "read -P 0xa5 4096 512",
        "-c",
        "read -P 0x5a 0 4096",
        "-c",
        "flush",
        "-c",
        "write -f -P 0x66 1536k 64k",
        "-c",
        "read -P 0x66 1536k 64k",
        "-c",
        "write -z 2M 256k",
        "-c",
        "read -P 0 2M 256k",
        "-c",
        "discard 1M 64k",
        "-c",
        "read -P 0 1M 64k",
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // 16 asynchronous writes of qemu-io in flight at once, then read back.
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), url.clone()];
    for i in 0..16 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {}k 64k", 0x30 + i, 4096 + 64 * i));
    }
    args.extend(["-c".into(), "aio_flush".into()]);
    let out = with_n_in_flight(&emu, &win, 16, Command::new("qemu-io").args(&args));
    assert!(!out.contains("failed"), "{out}");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), url.clone()];
    for i in 0..16 {
        args.push("-c".into());
        args.push(format!("read -P {} {}k 64k", 0x30 + i, 4096 + 64 * i));
    }
    let out = run(Command::new("qemu-io").args(&args));
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // A second client sees the first one's data.
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", &url, "-c", "read -P 0x5a 8192 8192"]));
    assert!(!out.contains("failed"), "{out}");
    // qemu-img: the size, and a round trip through a file.
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &url]));
    assert!(info.contains("\"virtual-size\": 16777216"), "{info}");
    let img = dir.join("copy.raw");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &url,
        img.to_str().unwrap(),
    ]));
    let copy = std::fs::read(&img).unwrap();
    assert_eq!(copy.len(), 16 << 20);
    assert!(copy[..4096].iter().all(|&b| b == 0x5a));
    assert!(copy[4096..4608].iter().all(|&b| b == 0xa5));

    if have("nbdinfo") && have("nbdcopy") {
        let out = run(Command::new("nbdinfo").arg(&url));
        assert!(out.contains("16777216"), "{out}");
        assert!(out.contains("can_multi_conn: true"), "{out}");
        let src = dir.join("src.raw");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        // Two connections, 16 requests each; the function paused until 16 commands wait.
        with_n_in_flight(
            &emu,
            &win,
            16,
            Command::new("nbdcopy").args([
                "--connections=2",
                "--requests=16",
                src.to_str().unwrap(),
                &url,
            ]),
        );
        let back = dir.join("back.raw");
        run(Command::new("nbdcopy").args([&url, back.to_str().unwrap()]));
        assert_eq!(&std::fs::read(&back).unwrap()[..data.len()], &data[..]);
    } else {
        eprintln!("note: nbdinfo/nbdcopy (libnbd-bin) not installed; that part skipped");
    }

    if have("fio") {
        // fio's nbd engine (libnbd): random writes with checksums at queue depth 32 (32
        // commands in flight at once), then every block read back and verified.
        let fio = |rw: &str| {
            let mut c = Command::new("fio");
            c.args([
                "--name=nbd",
                "--ioengine=nbd",
                &format!("--uri={url}"),
                &format!("--rw={rw}"),
                "--bs=4k",
                "--iodepth=32",
                "--size=8m",
                "--offset=8m",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ]);
            c
        };
        let out = with_n_in_flight(&emu, &win, 32, &mut fio("randwrite"));
        assert!(out.contains("err= 0"), "{out}");
    } else {
        eprintln!("note: fio not installed; its nbd engine part skipped");
    }

    stop.store(true, Ordering::Relaxed);
    let stats = server.join().unwrap();
    eprintln!("server: {stats:?}");
    assert!(stats.peak_commands >= 16, "{stats:?}");
    emu.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
